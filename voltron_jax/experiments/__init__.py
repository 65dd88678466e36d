"""Experiments built on the train loop: sweeps (ablate.py) and their decision rules (claims.py), comparing
finished runs on one validation set (evaluate.py), the c-BTM ensemble (ensemble.py) and passkey retrieval
(passkey_eval.py)."""
