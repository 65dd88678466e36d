"""Slot tables (config choice name -> module class, one plain dict per slot) and the interface of each
slot, one `typing.Protocol` per slot (docs/design.md, "The model: one backbone, six slots").

Technique modules are imported lazily so `import voltron_jax.registry` has no side effects and no heavy
imports. Each entry is "module:attribute". Every registered class implements its slot's protocol in
full (tests/test_registry.py inspects the signatures); the hooks every slot class has are `SlotHooks`:

  - `from_config(m) -> dict`   the module fields it takes from the model config `m` (<= ~8; {} if none),
  - `flops_per_token(m, seq_len) -> float`   analytic forward FLOPs per token (what each slot counts is
    in its protocol; decoder.flops_per_token sums them),
  - `validate(config) -> None`   extra checks of the whole config, raising voltron_jax.errors.ConfigError.

Module slots (linear, attention, memory, ffn, residual) are Flax modules: the protocol's annotated
fields are the ones decoder.build_model passes (the rest come from `from_config`), and `__call__` is
the signature their caller uses. Routing is a plain class: it wraps the block factory per layer.

A slot class is also the one place that declares what its technique adds to the rest of the library
(class attributes, all optional; `declared(cls)` reads them with their defaults, `Declared` documents
each). config.get_default, run/resume.py, run/report.py, optim.py and sharding.py read them through the
functions at the end of this file, never by technique name; docs/design.md has the checklist for adding
a technique and tests/test_registry.py registers a toy slot from the test file and trains it.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any, Protocol

# --------------------------------------------------------------------------------------------- protocols


class SlotHooks(Protocol):
    """Static hooks of every slot class."""

    @staticmethod
    def from_config(m) -> dict:
        """Module fields (or wrapper arguments) taken from the model config `m`."""
        ...

    @staticmethod
    def flops_per_token(m, seq_len: int) -> float:
        """Analytic forward FLOPs per token (see the slot's protocol for what is counted)."""
        ...

    @staticmethod
    def validate(config) -> None:
        """Raise ConfigError for a config this class cannot run; return None otherwise."""
        ...


class LinearSlot(SlotHooks, Protocol):
    """Every projection: `linear(features, kernel_axes, name=...)` maps x [..., in] -> [..., features],
    2-D kernel [in, features] with logical axes `kernel_axes`. flops_per_token: FLOPs one layer's linear
    maps add beyond the 2 * in * out of each matmul, which the attention and ffn slots count (0 when the
    extra work is elementwise). May add `ragged_dot(params, x, group_sizes)` for dropless MoE, and
    `expert_shards(variables, specs, x)` for the grouped MoE's shard_map: E stacked experts on x [E,R,in]
    from local weight shards laid out by `specs` (moe_groups; None: gather the weights whole instead)."""

    features: int
    kernel_axes: tuple
    init_std: float
    dtype: Any

    def __call__(self, x): ...


class AttentionSlot(SlotHooks, Protocol):
    """Token mixing: projections from `linear`, the attention itself from `core` (the memory slot).
    flops_per_token: one layer's projections (and routers), not the core's. core_head_factor(m): query
    heads the core sees per model head (decoder multiplies the memory slot's FLOPs by it)."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    core: Any
    linear: Any

    def __call__(self, x, positions, segment_ids=None, valid=None): ...

    @staticmethod
    def core_head_factor(m) -> int: ...


class MemorySlot(SlotHooks, Protocol):
    """The attention core: RoPE and attention of q [B,T,H,K] over k, v [B,T,G,K] -> [B,T,H,K].
    flops_per_token: one layer's QK^T and AV (and memory) FLOPs per query head set at length seq_len.
    segment_len_of(m): tokens per memory segment, 0 when the core attends over the whole row; a core
    with segments has a `segment_len` field that routing may override (MoD's per-segment top-k)."""

    rope_theta: float
    impl: str
    decode: bool
    dtype: Any

    def __call__(self, q, k, v, positions, segment_ids=None, valid=None): ...

    @staticmethod
    def segment_len_of(m) -> int: ...


class FFNSlot(SlotHooks, Protocol):
    """Channel mixing x [B,T,D] -> [B,T,D], projections from `linear`. flops_per_token: one layer's
    active FLOPs per token (routers included)."""

    d_ff: int
    linear: Any

    def __call__(self, x): ...


class ResidualSlot(SlotHooks, Protocol):
    """Runs all `layers` (callables name=... -> layer module) over x [B,T,D] as super-blocks of `period`
    layers, scanned or unrolled, rematerialised per `remat`. period_of(m): the layer count its own
    pattern repeats over (the super-block size is the lcm with the routing period). flops_per_token:
    the whole model's extra FLOPs per token of the residual scheme."""

    layers: tuple
    period: int
    scan: bool
    remat: str

    def __call__(self, x, positions, segment_ids=None, valid=None): ...

    @staticmethod
    def period_of(m) -> int: ...


BlockFactory = Callable[..., Callable[..., Any]]
"""decoder.build_model's `make_block(**core_overrides)`: the block constructor (callable(name=...) ->
Block) with the memory core's fields overridden, e.g. make_block(segment_len=k)."""


class RoutingSlot(SlotHooks, Protocol):
    """Which tokens each layer computes. wrap(make_block, index, m, decode): layer `index` as
    callable(name=...) -> module with the Block's call signature, built from the block factory
    (`BlockFactory`) only. period_of(m): layers per routing pattern. layer_fraction(m, index): share of
    tokens layer `index` computes. flops_per_token: the whole model's router FLOPs per token."""

    @staticmethod
    def wrap(make_block: BlockFactory, index: int, m, decode: bool = False) -> Callable[..., Any]: ...

    @staticmethod
    def period_of(m) -> int: ...

    @staticmethod
    def layer_fraction(m, index: int) -> float: ...


# --------------------------------------------------------------------------------------------- tables

LINEAR = {
    "dense": "voltron_jax.models.layers:Dense",
    "bitlinear": "voltron_jax.models.bitlinear:BitLinear",
}
ATTENTION = {
    "mha": "voltron_jax.models.attention:Attention",
    "moa": "voltron_jax.models.moa:MixtureOfAttention",
}
MEMORY = {
    "none": "voltron_jax.models.attention:CausalCore",
    "infini": "voltron_jax.models.infini_attention:InfiniCore",
}
FFN = {
    "mlp": "voltron_jax.models.layers:MLP",
    "moe": "voltron_jax.models.moe:MoE",
}
RESIDUAL = {
    "plain": "voltron_jax.models.decoder:PlainResidual",
    "denseformer": "voltron_jax.models.denseformer:DenseFormerResidual",
}
ROUTING = {
    "none": "voltron_jax.models.decoder:NoRouting",
    "mod": "voltron_jax.models.mod:MoDRouting",
}
PROTOCOLS = {
    "linear": LinearSlot,
    "attention": AttentionSlot,
    "memory": MemorySlot,
    "ffn": FFNSlot,
    "residual": ResidualSlot,
    "routing": RoutingSlot,
}
# Declarations are read in this order (reports list the MoE's drop rate before the MoA's).
TABLES = {
    "linear": LINEAR,
    "ffn": FFN,
    "attention": ATTENTION,
    "memory": MEMORY,
    "residual": RESIDUAL,
    "routing": ROUTING,
}


def get(slot: str, name: str):
    """The class registered for `name` in `slot`; a clear error for unknown or unbuilt choices."""
    table = TABLES[slot]
    if name not in table:
        raise KeyError(f"model.{slot}={name!r} is unknown; choose one of {sorted(table)}.")
    entry = table[name]
    if not isinstance(entry, str):  # a class registered directly (register())
        return entry
    module, attr = entry.split(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise NotImplementedError(
            f"model.{slot}={name!r} is registered but {entry} cannot be loaded ({e})."
        ) from e


def register(slot: str, name: str, entry) -> None:
    """Add choice `name` to `slot`: a class, or "module:attribute" loaded on first use. Raises ValueError
    for an unknown slot, a taken name, or a class that does not implement the slot's protocol."""
    if slot not in TABLES:
        raise ValueError(f"unknown slot {slot!r}; slots are {sorted(TABLES)}.")
    if name in TABLES[slot]:
        raise ValueError(f"model.{slot}={name!r} is registered already ({TABLES[slot][name]}).")
    if not isinstance(entry, str) and (errors := conformance_errors(slot, entry)):
        raise ValueError(f"{entry.__name__} does not implement the {slot} slot: {'; '.join(errors)}.")
    TABLES[slot][name] = entry


def unregister(slot: str, name: str) -> None:
    """Remove a choice added by `register` (tests)."""
    del TABLES[slot][name]


def choices(slot: str) -> tuple[str, ...]:
    """The registered names of `slot`, the default (the first) first."""
    return tuple(TABLES[slot])


def selected(model_cfg) -> dict:
    """{slot: class} for the choices in a model config."""
    return {slot: get(slot, model_cfg[slot]) for slot in TABLES}


def validate_slots(config) -> None:
    """Run each selected slot's own `validate(config)`."""
    for cls in selected(config.model).values():
        cls.validate(config)


def _members(protocol) -> tuple[dict[str, Any], dict[str, Any]]:
    """(fields, methods) a protocol declares, its bases' included."""
    fields, methods = {}, {}
    for base in reversed(protocol.__mro__):
        if base in (object, Protocol) or not getattr(base, "_is_protocol", False):
            continue
        fields.update({k: v for k, v in vars(base).get("__annotations__", {}).items()})
        methods.update(
            {
                k: v
                for k, v in vars(base).items()
                if isinstance(v, staticmethod) or (inspect.isfunction(v) and k == "__call__")
            }
        )
    return fields, methods


def _func(member):
    return member.__func__ if isinstance(member, staticmethod | classmethod) else member


def _params(member) -> list[tuple[str, Any, bool]]:
    sig = inspect.signature(_func(member))
    return [(p.name, p.kind, p.default is not p.empty) for p in sig.parameters.values()]


def conformance_errors(slot: str, cls) -> list[str]:
    """What `cls` lacks to implement slot `slot`'s protocol: each declared field (a dataclass field or
    class attribute) and each method with the same parameters (names, kinds, which have defaults; more
    parameters are allowed only with defaults), static where the protocol's is. Empty when it conforms."""
    fields, methods = _members(PROTOCOLS[slot])
    errors = []
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    for name in fields:
        if name not in names and not hasattr(cls, name):
            errors.append(f"{cls.__name__} has no field {name!r}")
    for name, want in methods.items():
        got = inspect.getattr_static(cls, name, None)
        if got is None:
            errors.append(f"{cls.__name__}.{name} is missing")
            continue
        if isinstance(want, staticmethod) and not isinstance(got, staticmethod):
            errors.append(f"{cls.__name__}.{name} must be a staticmethod")
            continue
        w, g = _params(want), _params(got)
        if g[: len(w)] != w or any(not has_default for _, _, has_default in g[len(w) :]):
            errors.append(
                f"{cls.__name__}.{name}{inspect.signature(_func(got))} does not match the protocol's "
                f"{name}{inspect.signature(_func(want))}"
            )
    return errors


# --------------------------------------------------------------------------------------------- declarations


@dataclasses.dataclass(frozen=True)
class Declared:
    """What a slot class adds to the library beyond its module, read from its class attributes of the
    same names in capitals (`CONFIG_KEY`, `DEFAULTS`, ...); every attribute is optional.

    config_key: the `config.model` sub-dict holding its hyperparameters ('' for none).
    defaults: that sub-dict's fields and default values (config.get_default builds it from them).
    aux_losses: {name: default weight} of each loss it sows into the 'aux_loss' collection
        (config.aux_weights; train.py refuses a sown loss without a weight).
    runtime_fields: fields of its sub-dict that only change how it executes (dispatch impl, capacity),
        so they may change when a run resumes (run/resume.py guards every other model field).
    metrics: {sown 'stats' name: display name} of rates the reports average (run/report.py; today the
        MoE/MoA drop rates).
    param_groups: ((path names, group), ...): a param whose path contains `path names` as consecutive
        components joins optimizer group `group` (optim.GROUPS); checked before the generic rules, and
        only for the slot classes the model config selects.
    sharding_rules: ((logical axis, mesh axes or None), ...) its modules use beyond sharding.BASE_RULES;
        appended to the table in registry order (identical rules of several slots count once).
    """

    config_key: str = ""
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    aux_losses: Mapping[str, float] = dataclasses.field(default_factory=dict)
    runtime_fields: tuple[str, ...] = ()
    metrics: Mapping[str, str] = dataclasses.field(default_factory=dict)
    param_groups: tuple[tuple[tuple[str, ...], str], ...] = ()
    sharding_rules: tuple[tuple[str, Any], ...] = ()


def declared(cls) -> Declared:
    """The declarations of slot class `cls` (its class attributes; defaults where it has none)."""
    return Declared(
        **{
            f.name: getattr(cls, f.name.upper())
            for f in dataclasses.fields(Declared)
            if hasattr(cls, f.name.upper())
        }
    )


def all_declared() -> list[Declared]:
    """Declarations of every registered class, in table order (each class once)."""
    seen, out = set(), []
    for slot, table in TABLES.items():
        for name in table:
            cls = get(slot, name)
            if cls not in seen:
                seen.add(cls)
                out.append(declared(cls))
    return out


def config_defaults() -> dict[str, dict]:
    """{model sub-dict name: its default fields} over every registered class. Two classes may share a
    sub-dict only with the same defaults."""
    out: dict[str, dict] = {}
    for d in all_declared():
        if not d.config_key:
            continue
        if d.config_key in out and out[d.config_key] != dict(d.defaults):
            raise ValueError(f"two slot classes declare model.{d.config_key} with different defaults.")
        out[d.config_key] = dict(d.defaults)
    return out


def aux_loss_defaults() -> dict[str, float]:
    """{aux loss name: default weight} of every registered class."""
    return {k: v for d in all_declared() for k, v in d.aux_losses.items()}


def runtime_fields() -> frozenset[str]:
    """Dotted `model.<sub-dict>.<field>` names that may change on resume, over every registered class."""
    return frozenset(f"model.{d.config_key}.{f}" for d in all_declared() for f in d.runtime_fields)


def metrics() -> dict[str, str]:
    """{sown 'stats' name: display name} over every registered class."""
    return {k: v for d in all_declared() for k, v in d.metrics.items()}


def param_group_rules(model_cfg=None) -> tuple[tuple[tuple[str, ...], str], ...]:
    """The param-group rules of the classes `model_cfg` selects (every registered class when None)."""
    classes = selected(model_cfg).values() if model_cfg is not None else None
    decls = [declared(c) for c in classes] if classes is not None else all_declared()
    return tuple(rule for d in decls for rule in d.param_groups)


def sharding_rules() -> tuple[tuple[str, Any], ...]:
    """Every registered class's logical-axis rules, in registry order, each distinct rule once. A
    logical name may map to only one mesh placement."""
    out: dict[str, Any] = {}
    for d in all_declared():
        for name, axes in d.sharding_rules:
            if name in out and out[name] != axes:
                raise ValueError(f"slot classes map logical axis {name!r} to both {out[name]} and {axes}.")
            out[name] = axes
    return tuple(out.items())
