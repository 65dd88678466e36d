"""Export a trained BitNet checkpoint to 2-bit packed inference weights; load and run the packed model.

    python -m voltron_jax.inference.export_bitnet --phase_dir=runs/bitnet/01_decay --out=runs/bitnet/packed
    python -m voltron_jax.inference.export_bitnet --config=configs/bench_1b.py:bitlinear     # bytes only

The packed model is the same Decoder built with `model.bitlinear.packed=True`: every BitLinear holds
'packed' (ternary codes, 4 per byte, voltron_jax/models/bitlinear.py:pack_ternary) and 'scale' (beta =
mean|W|, multiplied) instead of its fp32 'kernel', and runs int8 activations x int8 weights with int32
accumulation. Everything that is never quantised (embeddings, LM head, norms, routers) is copied as is.
Binary (b1) weights use the same 2-bit codes ({-1, +1} only). The output folder holds `params/` (Orbax)
and `config.json` (the source phase's config with packed=True), so it is self-describing.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import flags
from etils import epath
from flax import traverse_util

from voltron_jax import cli
from voltron_jax.models import bitlinear, decoder
from voltron_jax.run import checkpoint
from voltron_jax.run import workdir as workdir_lib


def packed_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of a full config whose model runs from packed weights; BitNet models only."""
    if config.model.linear != "bitlinear":
        raise ValueError(
            f"model.linear={config.model.linear!r}: only BitNet checkpoints "
            "(model.linear='bitlinear') can be packed."
        )
    out = ml_collections.ConfigDict(config.to_dict())
    out.model.bitlinear.packed = True
    return out


def abstract_params(model_cfg: ml_collections.ConfigDict) -> dict:
    """Unboxed param shapes of the model built from `model_cfg` (nothing is allocated)."""
    model = decoder.build_model(model_cfg)
    # Params do not depend on the length; Infini-attention only takes whole segments.
    length = model_cfg.infini.segment_len if model_cfg.memory == "infini" else 8
    ids = jnp.zeros((1, length), jnp.int32)
    return nn.unbox(jax.eval_shape(lambda k: model.init(k, ids)["params"], jax.random.key(0)))


def _flat(tree) -> dict:
    return traverse_util.flatten_dict(tree)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _pack_kernel(kernel: jax.Array, weights: str, eps: float) -> dict:
    """{'packed': uint8 codes, 'scale': beta per matrix} of a kernel [..., in, out]."""
    w_int, beta = bitlinear.quantize_weight(kernel, weights, eps)
    return {"packed": bitlinear.pack_ternary(w_int), "scale": beta[..., 0, 0]}


def pack_params(params: dict, config: ml_collections.ConfigDict) -> dict:
    """Full-precision BitNet params -> packed inference params for `packed_config(config)`.

    Key mapping: each BitLinear's '<path>/kernel' [..., in, out] fp32 becomes '<path>/packed' uint8
    [..., ceil(in/4), out] and '<path>/scale' [...] fp32 (one per matrix: per layer when scanned, per
    expert when stacked); every other leaf is copied unchanged. Shapes are checked against the packed
    model, so a mismatched config fails here rather than at inference."""
    b = config.model.bitlinear
    target = _flat(abstract_params(packed_config(config).model))
    src = _flat(params)
    out, used = {}, set()
    for path, spec in target.items():
        is_bitlinear = path[-1] in ("packed", "scale") and path[:-1] + ("packed",) in target
        key = path[:-1] + ("kernel",) if is_bitlinear else path
        if key not in src:
            raise KeyError(f"checkpoint has no param {'/'.join(key)}; was it trained with this config?")
        used.add(key)
        if is_bitlinear:
            value = _pack_kernel(jnp.asarray(src[key]), b.weights, b.eps)[path[-1]]
        else:
            value = jnp.asarray(src[key])
        if value.shape != spec.shape or value.dtype != spec.dtype:
            raise ValueError(
                f"{'/'.join(path)}: got {value.shape} {value.dtype}, the packed model expects "
                f"{spec.shape} {spec.dtype}."
            )
        out[path] = value
    extra = sorted("/".join(k) for k in set(src) - used)
    if extra:
        raise ValueError(f"checkpoint params {extra[:5]} have no place in the packed model; wrong config?")
    return traverse_util.unflatten_dict(out)


def linear_weight_bytes(config: ml_collections.ConfigDict) -> dict:
    """Bytes of the BitLinear weights stored as bf16 vs packed (2-bit codes + one fp32 scale per
    matrix), from shapes only (works for any size without allocating)."""
    packed = _flat(abstract_params(packed_config(config).model))
    dense = _flat(abstract_params(config.model))
    bf16 = packed_bytes = 0
    for path, spec in packed.items():
        if path[-1] == "packed":
            bf16 += 2 * math.prod(dense[path[:-1] + ("kernel",)].shape)
            packed_bytes += math.prod(spec.shape)
        elif path[-1] == "scale" and path[:-1] + ("packed",) in packed:
            packed_bytes += 4 * math.prod(spec.shape)
    return dict(bf16_bytes=bf16, packed_bytes=packed_bytes, ratio=bf16 / max(packed_bytes, 1))


# --------------------------------------------------------------------------------------------- files


def restore_phase(phase_dir: str) -> tuple[dict, ml_collections.ConfigDict]:
    """(params, config) of the latest checkpoint in a phase folder written by the train loop."""

    ck = checkpoint.Checkpointer(workdir_lib.ckpt_dir(epath.Path(phase_dir)))
    step = ck.latest_step()
    if step is None:
        raise FileNotFoundError(
            f"{phase_dir}/ckpt holds no checkpoint; pass a finished phase folder "
            "such as runs/<name>/01_decay."
        )
    state, _, meta = ck.restore(step)
    ck.close()
    return state["params"], ml_collections.ConfigDict(meta["config"])


def save_packed(out_dir: str, params: dict, config: ml_collections.ConfigDict) -> None:
    """Write packed params (Orbax) and the packed config (JSON) to `out_dir`."""

    out = os.path.abspath(out_dir)
    os.makedirs(out, exist_ok=True)
    with ocp.StandardCheckpointer() as ck:
        ck.save(os.path.join(out, "params"), params, force=True)
    workdir_lib.write_json(os.path.join(out, workdir_lib.CONFIG), config.to_dict())


def load_packed(out_dir: str):
    """(model, params, config) of a packed export; `model.apply({'params': params}, ids)` -> logits."""

    out = os.path.abspath(out_dir)
    with open(os.path.join(out, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    target = abstract_params(config.model)
    with ocp.StandardCheckpointer() as ck:
        params = ck.restore(os.path.join(out, "params"), target)
    return decoder.build_model(config.model), params, config


def export(phase_dir: str, out_dir: str) -> dict:
    """Restore a phase's latest checkpoint, pack it, save it into `out_dir` (a new or empty folder: a
    workdir or a folder holding anything is refused before anything is read); returns the byte report."""
    workdir_lib.require_new_folder(out_dir)
    params, config = restore_phase(phase_dir)
    packed = pack_params(params, config)
    save_packed(out_dir, packed, packed_config(config))
    return linear_weight_bytes(config)


def _format(report: dict) -> str:
    return (
        f"linear weights: bf16 {report['bf16_bytes'] / 2**20:.2f} MiB, packed "
        f"{report['packed_bytes'] / 2**20:.2f} MiB ({report['ratio']:.2f}x smaller)"
    )


def entrypoint() -> None:
    """Command line: export a phase folder, or print the byte report of a config."""

    phase_dir = flags.DEFINE_string("phase_dir", "", "A finished phase folder of a BitNet run (holds ckpt/).")
    out = flags.DEFINE_string("out", "", "Output folder for the packed export.")
    config = flags.DEFINE_string("config", None, "Print the byte report of this config only.")

    def main(argv) -> None:
        del argv
        if phase_dir.value and out.value:
            print(_format(export(phase_dir.value, out.value)), f"-> {out.value}")
        elif config.value is not None:
            print(_format(linear_weight_bytes(cli.config_from_argv(config.value, cli.overrides()))))
        else:
            sys.exit(
                "usage: python -m voltron_jax.inference.export_bitnet --phase_dir=runs/x/01_decay --out=OUT\n"
                "   or: python -m voltron_jax.inference.export_bitnet --config=configs/bench_1b.py:bitlinear"
            )

    cli.run(main, doc=__doc__)


if __name__ == "__main__":
    entrypoint()
