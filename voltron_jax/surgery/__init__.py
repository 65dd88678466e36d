"""Checkpoint surgery: pure functions on param trees (btx.py), looked up by name for recipe phases.

A recipe phase with `init.surgery=<name>` gets its parents' params mapped by `apply(name, ...)` on the
host before resharding (voltron_jax/train.py). Names: 'btx_merge' (c-BTX: N branches -> one MoE+MoA
tree), 'upcycle' (sparse upcycling of one dense checkpoint). The CLI is `python -m voltron_jax.surgery`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from voltron_jax.surgery import tree as T
from voltron_jax.surgery.btx import (  # noqa: F401  (the public API)
    SurgeryError,
    branch,
    btx_merge,
    centroid_router_init,
    expert_axes,
    extract_expert,
    upcycle,
    validate,
)

SURGERIES = ("btx_merge", "upcycle")


def target_shapes(config) -> dict:
    """Boxed abstract params (logical axis names kept) of the model `config.model` describes."""
    from voltron_jax.models import decoder

    model = decoder.build_model(config.model)
    dummy = jnp.zeros((1, config.data.seq_len), jnp.int32)
    return jax.eval_shape(lambda k: model.init(k, dummy)["params"], jax.random.key(0))


def apply(name: str, sources: Sequence, target, *, config, sources_meta=None, key=None) -> dict:
    """Run surgery `name` on the parents' params `sources` for the model of `config`.

    `target` (plain or boxed abstract params) must match the config's model; the expert axes are read
    from the config's boxed shapes, so plain targets are fine. Routers: N(0, router_init_std^2) of
    config.model.moe. Returns host (numpy) params shaped like `target`."""
    del sources_meta  # the trees carry everything the mapping needs
    boxed = target_shapes(config)
    shapes = lambda t: {p: T.shape_of(leaf) for p, leaf in T.flatten(t).items()}
    if shapes(target) != shapes(boxed):
        raise SurgeryError(
            "the surgery target does not match config.model; pass the phase's own abstract "
            "params (jax.eval_shape of its model's init)."
        )
    std = config.model.moe.router_init_std
    if name == "btx_merge":
        return btx_merge(list(sources), boxed, key=key, router_std=std)
    if name == "upcycle":
        if len(sources) != 1:
            raise SurgeryError(
                f"surgery 'upcycle' takes one dense parent, got {len(sources)}; use 'btx_merge' "
                "to merge several branches."
            )
        return upcycle(sources[0], boxed, key=key, router_std=std)
    raise SurgeryError(f"init.surgery={name!r} is unknown; choose one of {SURGERIES}.")
