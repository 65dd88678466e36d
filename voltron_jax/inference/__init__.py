"""Using a trained checkpoint: `load` (api.py), sampling with a KV cache (generate.py) and the 2-bit packed
BitNet export (export_bitnet.py)."""
