"""Mesh builder, the one logical-axis rules table, and shardings for param trees and batches.

Mesh axes: data (pure data parallel), fsdp (data parallel with params sharded), tensor (heads / mlp
/ vocab), expert (MoE and MoA experts; also data parallel for the dense part). Params carry logical
axis names (`nn.with_logical_partitioning`); activations are constrained at block boundaries.
"""

from __future__ import annotations

import contextlib
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from voltron_jax import registry
from voltron_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor", "expert")
BATCH_AXES = ("data", "fsdp", "expert")

# logical name -> mesh axis (or axes, or None = replicated). Params first, then activations. These are the
# backbone's names; each slot class declares the names only it uses (registry.Declared.sharding_rules:
# 'router', 'gate', 'dwa', the MoE/MoA dispatch's 'act_expert', 'act_capacity', 'act_group'), which
# `rules()` appends. 'expert' (expert-stacked weights) stays here: it must precede 'embed'.
# flax applies the rules in order, each to the first dim of that name whose mesh axes are still free: an
# expert weight's 'expert' dim takes the expert axis first, so its 'embed' dim falls through to fsdp alone,
# while weights without an expert dim (embeddings, the K/V every MoA expert shares, norms, the MoD
# predictor) shard 'embed' over fsdp x expert: over every device, not 1/expert of them (MaxText does the
# same). With expert=1 the spec is plain 'fsdp' (fit_spec drops size-1 axes from multi-axis entries).
BASE_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("layers", None),
    ("expert", "expert"),
    ("vocab", "tensor"),
    ("embed", ("fsdp", "expert")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("norm", None),
    ("act_batch", BATCH_AXES),
    ("act_seq", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_vocab", "tensor"),
)


def rules() -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """The one logical-axis rules table: BASE_RULES, then every registered slot class's own rules."""
    return BASE_RULES + registry.sharding_rules()


def resolve_mesh(mesh, n_devices: int) -> dict[str, int]:
    """Mesh axis sizes from `config.mesh` with its one -1 filled in; raises ConfigError naming the fix if
    their product is not `n_devices`."""
    sizes = {a: int(mesh[a]) for a in MESH_AXES}
    fill = [a for a, v in sizes.items() if v == -1]
    if len(fill) > 1:
        raise ConfigError(f"mesh: only one axis may be -1 (fill), got {fill}.")
    if any(v == 0 or v < -1 for v in sizes.values()):
        raise ConfigError(f"mesh: axis sizes must be positive or -1, got {sizes}.")
    known = math.prod(v for v in sizes.values() if v != -1)
    if fill:
        if n_devices % known:
            raise ConfigError(
                f"mesh {sizes}: {n_devices} devices are not divisible by the fixed axes ({known})."
            )
        sizes[fill[0]] = n_devices // known
    if math.prod(sizes.values()) != n_devices:
        raise ConfigError(
            f"mesh {sizes} has {math.prod(sizes.values())} devices but {n_devices} are present; "
            f"set the axis sizes so their product is {n_devices}, or one axis to -1."
        )
    dcn = dcn_data(mesh)
    if dcn < 1 or sizes["data"] % dcn:
        raise ConfigError(
            f"mesh.dcn_data={dcn} must be >= 1 and divide mesh.data={sizes['data']} (the data axis spans the "
            f"slices); e.g. --config.mesh.data={max(dcn, 1)} --config.mesh.dcn_data={max(dcn, 1)}."
        )
    return sizes


def dcn_data(mesh) -> int:
    """How many slices (joined by the data-center network) the 'data' axis spans: `config.mesh.dcn_data`;
    1 (one slice) for a mesh dict without it. Only 'data' crosses slices: its gradient all-reduce is the
    one collective per step that goes over DCN, while fsdp/tensor/expert stay on each slice's ICI."""
    return int(mesh["dcn_data"]) if "dcn_data" in mesh else 1


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """A Mesh over `devices` (default: all) with axes (data, fsdp, tensor, expert) from config."""
    devices = jax.devices() if devices is None else devices
    sizes = resolve_mesh(mesh_cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    slices = len({getattr(d, "slice_index", None) or 0 for d in devices})
    dcn = dcn_data(mesh_cfg)
    if dcn != slices:
        raise ConfigError(
            f"mesh.dcn_data={dcn} but the devices span {slices} slice(s); set "
            f"--config.mesh.dcn_data={slices} (and mesh.data a multiple of it): only the data axis "
            "crosses slices."
        )
    if slices > 1:  # data = dcn x (data / dcn): each slice holds a whole fsdp/tensor/expert sub-mesh
        ici = (sizes["data"] // dcn, *shape[1:])
        arr = jax.experimental.mesh_utils.create_hybrid_device_mesh(ici, (dcn, 1, 1, 1), devices)
        return Mesh(arr, MESH_AXES)
    try:
        arr = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # CPU and odd topologies: plain reshape in device order
        arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, MESH_AXES)


@contextlib.contextmanager
def context(mesh: Mesh):
    """The context every model trace runs under: `mesh` as JAX's current (abstract) mesh plus the RULES
    table. `nn.with_logical_constraint` is a silent no-op unless JAX reports a current mesh, and the
    legacy `with mesh:` no longer sets one, so activation constraints need this (tests/test_sharding.py
    checks they reach the lowered program). The abstract mesh only: eager arrays made inside stay where
    they were (a concrete `jax.set_mesh` would place them on the mesh, impossible for an AOT topology)."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules()):
        yield


def logical_to_spec(axes) -> PartitionSpec:
    """PartitionSpec for a tuple of logical axis names under RULES."""
    return nn.logical_to_mesh_axes(axes, rules())


def param_specs(boxed_tree):
    """PartitionSpecs for an (abstract) param tree whose leaves are nn.Partitioned boxes."""
    return nn.get_partition_spec(boxed_tree)


def fit_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Fit a spec to a shape: a dim keeps the longest prefix of its mesh axes whose product divides it (a
    259-entry byte vocabulary on tensor=2 is replicated instead of failing; 'embed' over fsdp x expert
    keeps fsdp where only fsdp divides), and multi-axis entries drop axes of size 1. Big matrices of real
    configs divide evenly."""
    out = []
    for i in range(len(shape)):
        names = axis_names(spec, i)
        if len(names) > 1:  # ('fsdp', 'expert') with expert=1 is 'fsdp'
            names = tuple(a for a in names if mesh.shape[a] > 1) or names[:1]
        while names and shape[i] % int(np.prod([mesh.shape[a] for a in names])):
            names = names[:-1]
        out.append(None if not names else names[0] if len(names) == 1 else names)
    return PartitionSpec(*out)


def traced_in(mesh: Mesh, fn):
    """`fn` entering `context(mesh)` itself, so a jit of it traces with the constraints (and the splash
    kernel's mesh) wherever it is called or lowered from: the train loop calls its steps outside any
    context."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with context(mesh):
            return fn(*args, **kwargs)

    return wrapped


def unboxed(boxed_tree):
    """The values of a boxed tree without flax's sharding constraint on unboxing (which needs a traced
    value: abstract trees are unboxed outside jit, under `context`)."""
    return jax.tree.map(
        lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x,
        boxed_tree,
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )


def tree_specs(mesh, boxed_tree):
    """Mesh PartitionSpecs for a tree of boxed (logically annotated) leaves; unannotated leaves replicate,
    and mesh axes that do not divide a dim are dropped for that dim (see fit_spec)."""
    return jax.tree.map(
        lambda s, a: fit_spec(s, a.shape, mesh),
        nn.logical_to_mesh(param_specs(boxed_tree), rules()),
        unboxed(boxed_tree),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def tree_shardings(mesh: Mesh, boxed_tree):
    """NamedShardings of `tree_specs`."""
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s),
        tree_specs(mesh, boxed_tree),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def axis_names(spec: PartitionSpec, dim: int) -> tuple[str, ...]:
    """The mesh axes sharding dim `dim` of `spec` (empty: replicated)."""
    axes = tuple(spec)[dim] if dim < len(spec) else None
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[B, T] batches: batch over the data-parallel axes, sequence replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def host_batch_to_global(mesh: Mesh, local: dict) -> dict:
    """Assemble per-host [B_local, T] numpy arrays into global jax Arrays sharded over batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


# ------------------------------------------------------------------ inside a shard_map (expert parallelism)


def _split_dims(spec: PartitionSpec, ndim: int, first: int) -> tuple[tuple[int, tuple[str, ...]], ...]:
    """(dim, mesh axes of size > 1) of every dim >= `first` that `spec` splits (inside a shard_map)."""
    split = (
        (d, tuple(n for n in axis_names(spec, d) if jax.lax.axis_size(n) > 1)) for d in range(first, ndim)
    )
    return tuple((d, names) for d, names in split if names)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _gather_as(v: jax.Array, dims: tuple, dtype) -> jax.Array:
    v = v.astype(dtype)
    for d, names in dims:
        v = jax.lax.all_gather(v, names, axis=d, tiled=True)
    return v


def _gather_as_fwd(v, dims, dtype):
    return _gather_as(v, dims, dtype), jnp.zeros((0,), v.dtype)  # the residual carries v's dtype only


def _gather_as_bwd(dims, dtype, src, g):
    g = g.astype(src.dtype)  # reduce-scatter the cotangent at the master weights' precision
    for d, names in reversed(dims):
        g = jax.lax.psum_scatter(g, names, scatter_dimension=d, tiled=True)
    return (g,)


_gather_as.defvjp(_gather_as_fwd, _gather_as_bwd)


def gather_whole(v: jax.Array, spec: PartitionSpec, dtype=None, first: int = 1) -> jax.Array:
    """Inside a shard_map: the local shard `v` (laid out by `spec`) all-gathered whole along every dim from
    `first` on (dim 0, the expert dim, stays local), cast to `dtype` before the gather so that the
    collective moves `dtype` bytes (bf16 instead of the fp32 master weights: half of them). The cast is
    elementwise, so the result equals gathering first and casting after; the backward reduce-scatters the
    cotangent in `v`'s own dtype, as the transpose of an fp32 gather would."""
    dims = _split_dims(spec, v.ndim, first)
    dtype = jnp.dtype(dtype or v.dtype)
    if not dims:
        return v.astype(dtype)
    return _gather_as(v, dims, dtype)


def shard_mean(v: jax.Array, spec: PartitionSpec, axes: tuple[int, ...]) -> jax.Array:
    """Inside a shard_map: the mean of the whole (unsharded) array over `axes` (kept as size-1 dims), from
    the local shard `v` laid out by `spec`: local sums, one psum over the mesh axes splitting those dims."""
    axes = tuple(a % v.ndim for a in axes)
    names = tuple(n for a in axes for n in axis_names(spec, a))
    total = jnp.sum(v, axis=axes, keepdims=True)
    count = math.prod(v.shape[a] for a in axes)
    if names:
        total = jax.lax.psum(total, names)
        count *= math.prod(jax.lax.axis_size(n) for n in names)
    return total / count
