"""voltron_jax: one JAX/Flax language model assembling BitNet b1.58, Infini-attention, DenseFormer,
Mixture-of-Depths, In-Context Pretraining, MiniCPM two-stage WSD pretraining and c-BTX upcycling.

Importing the package is light: data (Grain, ArrayRecord) and checkpoint code load only when used;
TensorFlow (through seqio) only for a SentencePiece vocabulary or a streamed TFDS corpus.
"""

__version__ = "0.1.0"


def load(path_or_workdir, step=None, **kwargs):
    """Load a trained checkpoint: a Model with `.config`, `.params`, `.generate(...)`, `.score(...)`.

    Accepts a run folder (the last phase with a checkpoint), a phase folder, its ckpt/ folder or a step
    folder; see voltron_jax/inference/api.py. JAX, Flax and Orbax are imported on the first call, not on
    import."""
    from voltron_jax.inference import api  # lazy: `import voltron_jax` stays light

    return api.load(path_or_workdir, step, **kwargs)
