"""Interop with the Hugging Face ecosystem: checkpoints in (hf_import) and out (hf_export, export_hf CLI),
transformers' packed BitNet format both ways (hf_bitnet), SentencePiece vocabularies as tokenizer.json
(spm_tokenizer), and an lm-evaluation-harness model (lm_eval_adapter, `voltron-lm-eval`). Needs the
optional extra `pip install -e .[interop]`; the core (train, models, config, data) never imports these
modules at module level."""
