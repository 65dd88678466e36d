"""Checkpoint surgery: pure functions on param trees (btx.py), looked up by name for recipe phases.

A recipe phase with `init.surgery=<name>` gets its parents' params mapped by `apply(name, ...)` on the
host before resharding (voltron_jax/train.py). Names: 'btx_merge' (c-BTX: N branches -> one MoE+MoA
tree), 'upcycle' (sparse upcycling of one dense checkpoint). Options (`config.surgery`, documented in
voltron_jax/config.py): `router_init` 'random' | 'centroid', `centroid_batches`, `router_scale`,
`seed_expert`. The centroid init needs data, so the loop hands `apply` a `Probe` that runs the merged
model on training batches of each branch's cluster. The CLI is `python -m voltron_jax.surgery`.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp

from voltron_jax.models import decoder
from voltron_jax.surgery import tree as T
from voltron_jax.surgery.btx import (  # noqa: F401  (the public API)
    SurgeryError,
    branch,
    btx_merge,
    centroid_router_init,
    expert_axes,
    extract_expert,
    router_centroids,
    upcycle,
    validate,
)

SURGERIES = ("btx_merge", "upcycle")


def target_shapes(config) -> dict:
    """Boxed abstract params (logical axis names kept) of the model `config.model` describes."""

    model = decoder.build_model(config.model)
    dummy = jnp.zeros((1, config.data.seq_len), jnp.int32)
    return jax.eval_shape(lambda k: model.init(k, dummy)["params"], jax.random.key(0))


@dataclasses.dataclass(frozen=True)
class Probe:
    """How a data-dependent surgery (router_init='centroid') runs the merged model; built by the loop.

    forward(host params) places the params once (e.g. on the phase's mesh) and returns run(batch) -> the
      model's sown 'intermediates' collection on the host, for one training batch;
    batches(i) -> an iterator of TRAINING batches of the data cluster that source i was trained on.
    """

    forward: Callable[[dict], Callable[[dict], dict]]
    batches: Callable[[int], Iterator[dict]]


def apply(
    name: str,
    sources: Sequence,
    target,
    *,
    config,
    sources_meta=None,
    key=None,
    seed_params=None,
    probe: Probe | None = None,
) -> dict:
    """Run surgery `name` on the parents' params `sources` for the model of `config`.

    `target` (plain or boxed abstract params) must match the config's model; the expert axes are read
    from the config's boxed shapes, so plain targets are fine. Routers: N(0, router_init_std^2) of
    config.model.moe, or with config.surgery.router_init='centroid' column i = router_scale * the
    centred, normalised mean router input of `centroid_batches` batches of cluster i (`probe.batches`),
    run through the randomly-routed merge (`probe.forward`). `seed_params` (needed iff
    config.surgery.seed_expert) is the last expert. Returns host (numpy) params shaped like `target`."""
    del sources_meta  # the trees carry everything the mapping needs
    boxed = target_shapes(config)
    shapes = lambda t: {p: T.shape_of(leaf) for p, leaf in T.flatten(t).items()}
    if shapes(target) != shapes(boxed):
        raise SurgeryError(
            "the surgery target does not match config.model; pass the phase's own abstract "
            "params (jax.eval_shape of its model's init)."
        )
    s, std = config.surgery, config.model.moe.router_init_std
    if name not in SURGERIES:
        raise SurgeryError(f"init.surgery={name!r} is unknown; choose one of {SURGERIES}.")
    if name == "upcycle" and (len(sources) != 1 or s.seed_expert or s.router_init != "random"):
        raise SurgeryError(
            f"surgery 'upcycle' takes one dense parent (got {len(sources)}) and random routers, without "
            "a seed expert (its experts are copies of that parent); use 'btx_merge' to merge branches."
        )
    if name == "upcycle":
        return upcycle(sources[0], boxed, key=key, router_std=std)
    if s.seed_expert != (seed_params is not None):
        raise SurgeryError(
            f"config.surgery.seed_expert={s.seed_expert} but seed params were "
            f"{'given' if seed_params is not None else 'not given'}; the loop passes the branches' "
            "parent phase as the seed exactly when surgery.seed_expert is on."
        )
    kw = dict(seed_params=seed_params, key=key, router_std=std, router_scale=s.router_scale)
    merge = lambda **more: btx_merge(list(sources), boxed, **kw, **more)
    merged = merge()
    if s.router_init == "random":
        return merged
    if s.router_init != "centroid" or probe is None:
        raise SurgeryError(
            f"surgery.router_init={s.router_init!r}: use 'random', or 'centroid' with a Probe "
            "(the train loop builds one: training batches of each branch's cluster)."
        )
    run = probe.forward(merged)
    batches = [itertools.islice(probe.batches(i), s.centroid_batches) for i in range(len(sources))]
    centroids = router_centroids(run, batches)
    del merged, run  # the random-router merge was only needed for the router inputs
    return merge(router_init="centroid", centroids=centroids)
