"""voltron_jax: a JAX/Flax research codebase for frontier-technique language models on TPU pods.

Install for development with the exact known-good set:
    pip install -c constraints.txt -e '.[test,data,aot,interop]'
"""

from setuptools import find_packages, setup

setup(
    name="voltron_jax",
    version="0.1.0",
    description="BitNet, Infini-attention, DenseFormer, MoD, ICP, MiniCPM WSD and c-BTX in one JAX/Flax model",
    packages=find_packages(include=["voltron_jax", "voltron_jax.*"]),
    python_requires=">=3.11,<3.13",
    install_requires=[
        "jax>=0.10,<0.12",
        "flax>=0.12,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "ml-collections>=1.1,<2",
        "seqio>=0.0.20,<0.1",
        "tensorflow>=2.21,<2.22",
        "tensorflow-datasets>=4.9.10,<5",
        # 0.2.0 imports against the protobuf 6.x runtime that apache-beam pins; 0.2.3 does not.
        "sentencepiece==0.2.0",
        # the train loop reads pre-tokenised ArrayRecord shards through Grain (voltron_jax/data/shards.py)
        "grain==0.2.18",
        "array-record==0.8.6",
        "numpy>=2,<3",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "tensorboard>=2.21,<2.22",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "ruff>=0.6",
            "nbformat>=5.10",
            "nbclient>=0.10",
            "ipykernel>=6",
        ],
        # libtpu pinned to the version jax[tpu]==0.10.2 names; used for TPU runs and CPU-host AOT compiles.
        "aot": ["libtpu==0.0.42"],
        "data": ["apache-beam>=2.77,<2.78", "faiss-cpu>=1.9,<2", "scikit-learn>=1.5,<2"],
        # Hugging Face checkpoints in/out and the lm-evaluation-harness model (voltron_jax/interop/); never
        # imported by the core. torch runs transformers' forward in the interop tests (the CPU wheel);
        # transformers' BitNet quantizer refuses to load a packed BitNet without accelerate.
        "interop": [
            "transformers>=5.25,<6",
            "safetensors>=0.8,<0.9",
            "tokenizers>=0.23,<0.24",
            "lm-eval>=0.4.13,<0.5",
            "torch>=2.13,<2.14",
            "accelerate>=1.16,<2",
        ],
        # TensorBoard's Profile tab (xprof) for the traces of train.profile_step / profile_steps
        "profile": ["tensorboard-plugin-profile>=2.24,<2.25"],
        # optional Weights & Biases logging (train.wandb_project; imported only when set)
        "track": ["wandb>=0.29,<0.30"],
    },
    entry_points={
        "console_scripts": [
            "voltron=voltron_jax.main:entrypoint",
            # lm_eval's command line with the 'voltron' model registered (needs the interop extra)
            "voltron-lm-eval=voltron_jax.interop.lm_eval_adapter:main",
        ]
    },
)
