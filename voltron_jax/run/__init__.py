"""A run's files on disk: the workdir layout, checkpoints, resume guards, the run lock, run info, metrics
and the end-of-run report. Nothing here knows a model; train.py drives it."""
