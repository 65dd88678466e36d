"""Export a run (or one checkpoint) as a Hugging Face checkpoint that transformers loads with no custom code.

    python -m voltron_jax.interop.export_hf --workdir=runs/demo --out=exported/demo [--step=N] [--notokenizer]

--workdir is anything `voltron_jax.load` accepts (a run folder: its last phase with a checkpoint; a phase
folder; a ckpt/ folder; one step folder). --out must be a new or empty folder: an existing non-empty one
is refused and nothing is written (never overwrites a user's files). Writes model.safetensors (fp32),
config.json and the tokenizer (voltron_jax/interop/hf_export.py says which class and what is refused);
then `transformers.AutoModelForCausalLM.from_pretrained(out)` and `AutoTokenizer.from_pretrained(out)`.
Needs the optional extra: pip install -e '.[interop]'.
"""

from __future__ import annotations

import sys

import jax
from absl import flags

from voltron_jax import cli as cli_lib
from voltron_jax.inference import api
from voltron_jax.interop import hf_export


def export_run(workdir: str, out: str, step: int | None = None, tokenizer: bool = True) -> str:
    """Export the checkpoint `voltron_jax.load(workdir, step)` finds to `out`; returns a one-line summary."""

    hf_export.check_out(out)  # before anything is read
    lm = api.load(workdir, step=step)
    hf_export.check_exportable(lm.config.model)
    hf_export.export(jax.device_get(lm.params), lm.config, out, tokenizer=tokenizer)
    return f"{lm.path} step {lm.step} -> {out} ({hf_export.architecture(lm.config.model)})"


def cli() -> None:
    """Command line (flags defined here, not at import: main and evaluate define --workdir too)."""

    workdir = flags.DEFINE_string("workdir", "", "A run, phase, ckpt/ or step folder (as voltron_jax.load).")
    out = flags.DEFINE_string("out", "", "New or empty output folder for the Hugging Face checkpoint.")
    step = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest committed one).")
    tokenizer = flags.DEFINE_bool("tokenizer", True, "Write the run's vocabulary as tokenizer.json.")

    def main(argv) -> None:
        del argv
        if not workdir.value or not out.value:
            sys.exit("usage: python -m voltron_jax.interop.export_hf --workdir=runs/demo --out=exported/demo")
        print(export_run(workdir.value, out.value, step.value, tokenizer.value), flush=True)

    cli_lib.run(main, doc=__doc__)


if __name__ == "__main__":
    cli()
