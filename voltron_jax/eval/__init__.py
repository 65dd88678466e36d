"""Evaluations beyond validation loss: passkey retrieval (passkey.py)."""
