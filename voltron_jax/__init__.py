"""voltron_jax: one JAX/Flax language model assembling BitNet b1.58, Infini-attention, DenseFormer,
Mixture-of-Depths, In-Context Pretraining, MiniCPM two-stage WSD pretraining and c-BTX upcycling.

Importing the package is light: data (seqio/TensorFlow) and checkpoint code load only when used.
"""

__version__ = "0.1.0"
