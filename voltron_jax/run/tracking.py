"""Optional experiment tracking beside TensorBoard and metrics.jsonl: Weights & Biases.

    --config.train.wandb_project=voltron [--config.train.wandb_entity=team] \
        [--config.train.wandb_mode=offline]

Off unless `train.wandb_project` is set; `wandb` is imported only then (the `track` extra installs it; a
run that asks for it without it fails before the first step, naming the extra). One W&B run per phase
(or fan-out member), named `<workdir name>/<phase label>`, with the phase's resolved config, in the
run group of the workdir; its id follows from the workdir and label, so a resumed phase logs into the
same W&B run. Scalars are logged as `<kind>/<name>` at the global step, like TensorBoard's.
`wandb_mode`: online | offline (logs under <phase>/wandb, `wandb sync` later) | disabled; empty: W&B's
default (the WANDB_MODE environment variable, else online). Only process 0 logs.

Goodput (MaxText's `enable_goodput_recording`, the `ml-goodput-measurement` package) records job and
step times to Google Cloud Logging and needs a GCP project with the Logging API: it is pod-only and not
wired into this loop; see docs/pods.md.
"""

from __future__ import annotations

import hashlib

import jax
from etils import epath

from voltron_jax.errors import ConfigError

MODES = ("", "online", "offline", "disabled")


class WandbTracker:
    def __init__(self, config, phase_dir: epath.Path, label: str):
        t = config.train
        if t.wandb_mode not in MODES:
            raise ConfigError(
                f"train.wandb_mode={t.wandb_mode!r}; valid: {list(MODES)} (empty: W&B's default)."
            )
        try:
            import wandb  # lazy: optional
        except ImportError as e:
            raise ConfigError(
                "train.wandb_project is set but wandb is not installed: pip install -e '.[track]' "
                "(or leave train.wandb_project empty)."
            ) from e
        phase_dir = epath.Path(phase_dir)
        root = str(phase_dir.parent if "/" not in label else phase_dir.parent.parent)  # the workdir
        run_id = hashlib.sha1(f"{root}|{label}".encode()).hexdigest()[:16]
        group = epath.Path(root).name
        phase_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=t.wandb_project,
            entity=t.wandb_entity or None,
            mode=t.wandb_mode or None,
            group=group,
            name=f"{group}/{label}",
            id=run_id,
            resume="allow",
            dir=str(phase_dir),
            config=config.to_dict(),
            reinit="create_new",
        )

    def log(self, step: int, scalars: dict[str, float], kind: str) -> None:
        self.run.log({f"{kind}/{k}": v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


def make(config, phase_dir: epath.Path, label: str) -> WandbTracker | None:
    """The tracker `config.train.wandb_project` asks for (on process 0), or None."""
    if not config.train.wandb_project or jax.process_index() != 0:
        return None
    return WandbTracker(config, phase_dir, label)
