"""c-BTX from a pretrained Hugging Face seed (the BTX paper starts from Llama-2 7B): import, branch, merge.

Run:  python -m voltron_jax.main --config=configs/cbtx_hf.py:/path/to/hf_llama --workdir=runs/cbtx_hf
      (append ',test' to the argument for a seconds-long smoke size: `...:/path/to/hf_llama,test`)

The folder is a Llama / Mistral checkpoint saved by transformers (config.json, *.safetensors,
tokenizer.json). The model is the checkpoint's exact architecture and its tokenizer is the run's
vocabulary (voltron_jax.interop.hf_import.configure: data.vocab='tokenizers'). Recipe:
  prepare  embed -> c-BTM balanced k-means (data.n_clusters) -> ICP order (voltron_jax/data/prepare.py)
  seed     init.from_='hf:<folder>': the pretrained weights, continued on the corpus   00_seed/
  branch   n_clusters copies of the seed, each trained on its cluster                 01_branch/cluster_i/
  mix      btx_merge: FFNs -> n_clusters-expert MoE, attention q/o -> MoA experts     02_mix/
  moe_ft   MoE+MoA fine-tune = the WSD decay stage                                    03_moe_ft/
Needs the optional extra: pip install -e '.[interop]'. Produces the usual report.md and per-cluster
validation perplexities; at full size the numbers depend on the seed checkpoint (docs/interop.md).
"""

import ml_collections

from voltron_jax import config

MOE_MODEL = {"model.ffn": "moe", "model.attention": "moa"}
# Every variant needs a checkpoint folder: tests/interop/test_hf_recipe.py builds and validates this
# config over a tiny local one (tests/test_configs.py iterates VARIANTS, which has none it could build).
VARIANTS = ()


def get_config(arg: str = ""):
    parts = [p for p in arg.split(",") if p]
    opts = {p for p in parts if p == "test"}
    paths = [p for p in parts if p != "test"]
    if len(paths) != 1:
        raise ValueError(
            f"configs/cbtx_hf.py: give one Hugging Face checkpoint folder, e.g. "
            f"--config=configs/cbtx_hf.py:/path/to/hf_llama[,test] (got {arg!r})."
        )
    from voltron_jax.interop import hf_import

    c = config.get_default()
    c.data.seq_len, c.data.batch_size = 256, 8
    c.data.ordering = "icp"
    c.data.n_clusters = 4
    c.data.val_fraction = 0.05
    hf_import.configure(c, paths[0])
    m = c.model
    m.moe.n_experts = m.moa.n_experts = c.data.n_clusters
    m.moe.top_k = m.moa.top_k = 2
    m.moe.impl, m.moe.capacity_factor = "capacity", 1.25
    c.optim.lr = 1e-3
    c.schedule.warmup = 10
    c.train.log_every, c.train.eval_every, c.train.ckpt_every, c.train.eval_batches = 10, 1000, 50, 2
    c.train.eval_clusters = True
    c.surgery.router_init = "random"
    seed, branch, ft = 50, 15, 30
    if "test" in opts:
        seed, branch, ft = 2, 2, 2
        c.data.seq_len, c.data.batch_size = 64, 8
        c.schedule.warmup = 1
        c.train.log_every, c.train.ckpt_every = 2, 2
        c.data.embed.fit_sample = 400
    c.recipe = ml_collections.ConfigDict()
    c.recipe.seed = config.phase(seed, mixture="pretrain", init_from=[f"hf:{paths[0]}"])
    c.recipe.branch = config.phase(branch, mixture="cluster", init_from=["seed"], fan_out=c.data.n_clusters)
    c.recipe.mix = config.phase(
        0,
        mixture="decay",
        init_from=["branch"],
        surgery="btx_merge",
        keep_optimizer=False,
        overrides=MOE_MODEL,
    )
    c.recipe.moe_ft = config.phase(ft, mixture="decay", stage="decay", init_from=["mix"], overrides=MOE_MODEL)
    return c
