"""Mixture-of-Experts SwiGLU FFN (FFN slot 'moe') and the token routing shared with moa.py.

Papers: Switch Transformers (arXiv 2101.03961: load-balancing loss, capacity), ST-MoE (arXiv 2202.08906:
router z-loss), GShard (arXiv 2006.16668: capacity dispatch), Branch-Train-MiX (arXiv 2403.07816: top-2
with gates renormalised over the chosen experts), MegaBlocks (arXiv 2211.15841: dropless grouped matmul).
Spec: techniques-b.md sections 4, 5 and 7.

Implemented: an fp32 softmax router (param `router` [D,E], never BitLinear, random init), top-k experts
per token, gates = softmax over the k chosen logits (they sum to 1, so identical experts reproduce the
dense FFN for any router), the Switch load-balancing loss E * sum_e f_e * p_e (f_e = share of the A*P
assignments routed to e, p_e = mean router probability, both over the whole batch: under jit/GSPMD a mean
over a sharded batch is global) and the z-loss mean(logsumexp(logits)^2), sown as `aux_loss/moe_lb`,
`aux_loss/moe_z`; the share of assignments dropped for want of capacity is sown as `stats/moe_drop_rate`
(train and eval report its mean over layers). Each expert is one copy of the linear slot: the projections
gate/up/down are `nn.vmap`s of the linear slot over a leading expert axis, so expert params are the dense
MLP's leaves stacked [E,...] with logical axes ('expert', ...) (Dense: gate/up [E,D,F], down [E,F,D]), and
a BitLinear expert keeps its own per-expert scales and norms. Five dispatch implementations (`impl`),
identical up to dropping, one object each (plan, dispatch, combine, project) in dispatch.py (grouped:
moe_groups.py), looked up once by name in `IMPLS`:   - 'capacity': GShard dispatch by a row gather into a
[E,C,D] buffer (not the [A,E,C] one-hot einsum,     which costs A*E*C*D), batched matmuls, a gather back;
the backward is two gathers as well (custom     VJP: no scatter-add). C = min(A, ceil(capacity_factor * A
* P / E)) rounded up to a multiple of 8.     Overflow is dropped (the token keeps its residual); priority
by position in the sequence, then     pick, then batch row, so a token never competes with later positions
(no causal leak). The fast GPU     path; dispatch and combine gathers serve 'dropless' too (with the sort
order as the map).   - 'dropless': assignments sorted by expert and `jax.lax.ragged_dot` (the TPU path).
Needs the raw     stacked params: Dense kernels directly; another linear class must offer
`ragged_dot(self, params, x [R,in], group_sizes [E]) -> [R,out]` (an instance method, called on an
unbound instance carrying the slot's fields).   - 'dense': every expert on every token, masked by the
gates (the reference for tests).   - 'grouped': 'capacity' with one group per sequence (per-row capacity,
batched gathers and an     all-to-all to the expert layout; moe_groups.py): the one that stays sharded on
pods.   - 'ragged': 'dropless' per device (tokens sorted by expert on the device holding them, grouped
matmuls on the FSDP-gathered expert weights; moe_ragged.py): dropless at pod scale.
Deviations: with top_k=1 the gate is the router probability itself (Switch), because a renormalised
top-1 gate is always 1 and the router would get no LM-loss gradient (techniques-b.md 5.1). Groups for
capacity are the whole batch (no per-device grouping); padding tokens are routed like real ones. Shape
letters beyond the house set: A = B*T tokens, P = top-k picks, R = rows of a dispatched layout."""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from voltron_jax import registry
from voltron_jax.errors import ConfigError
from voltron_jax.models import dispatch as dispatch_lib
from voltron_jax.models import moe_groups, moe_ragged
from voltron_jax.models.dispatch import Plan
from voltron_jax.models.layers import Dense, param_with_axes

# --------------------------------------------------------------------------------------------- routing


class Routing(NamedTuple):
    gates: jax.Array  # [A,P] fp32, sum to 1 over P when P > 1
    experts: jax.Array  # [A,P] int32


def load_balance_loss(probs: jax.Array, experts: jax.Array, n_experts: int) -> jax.Array:
    """Switch LB loss E * sum_e f_e p_e: probs [A,E] fp32, experts [A,P] chosen ids. 1.0 when uniform."""
    f = jnp.mean(jax.nn.one_hot(experts, n_experts, dtype=jnp.float32), axis=(0, 1))  # [E]
    p = jnp.mean(probs, axis=0)  # [E]
    return n_experts * jnp.sum(f * p)


def z_loss(logits: jax.Array) -> jax.Array:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)


def pick(values: jax.Array, experts: jax.Array) -> jax.Array:
    """values [A,E] at experts [A,P] -> [A,P], bit-identical to top_k's values / take_along_axis, as a
    masked sum whose gradient is a select: theirs is a scatter-add, which TPU/GPU serialise and libtpu's
    cost model prices at a -2 s sentinel (docs/results.md, issue 18). A*P*E work, E small."""
    hit = experts[..., None] == jnp.arange(values.shape[-1], dtype=experts.dtype)  # [A,P,E]
    return jnp.sum(jnp.where(hit, values[:, None, :], 0), axis=-1)  # [A,P]


def route(
    module: nn.Module, rows: jax.Array, n_experts: int, top_k: int, init_std: float, prefix: str
) -> Routing:
    """fp32 router of `module` on rows [A,D]: top-k experts, renormalised gates; sows `{prefix}_lb`,
    `{prefix}_z` (aux_loss) and the mean router input (intermediates, for centroid router init)."""
    w = param_with_axes(
        module, "router", nn.initializers.normal(init_std), (rows.shape[-1], n_experts), ("embed", "router")
    )
    x32 = rows.astype(jnp.float32)
    logits = x32 @ w  # [A,E]
    probs = jax.nn.softmax(logits, axis=-1)  # [A,E]
    _, experts = jax.lax.top_k(logits, top_k)  # [A,P]
    if top_k > 1:
        gates = jax.nn.softmax(pick(logits, experts), axis=-1)  # [A,P] renormalised over the chosen experts
    else:
        gates = pick(probs, experts)  # [A,1] Switch gate (see docstring)
    module.sow("aux_loss", f"{prefix}_lb", load_balance_loss(probs, experts, n_experts))
    module.sow("aux_loss", f"{prefix}_z", z_loss(logits))
    module.sow("intermediates", "router_input_mean", jnp.mean(x32, axis=0))
    return Routing(gates, experts.astype(jnp.int32))


# --------------------------------------------------------------------------------------------- dispatch

# The dispatch implementations by name (moe.impl / moa.impl); a layer picks its object once.
IMPLS: dict[str, dispatch_lib.Dispatch] = {
    "capacity": dispatch_lib.CAPACITY,
    "dropless": dispatch_lib.DROPLESS,
    "dense": dispatch_lib.DENSE,
    "grouped": moe_groups.GROUPED,
    "ragged": moe_ragged.RAGGED,
}


def get_impl(impl: str) -> dispatch_lib.Dispatch:
    """The dispatch implementation named `impl`; a clear error naming the choices."""
    if impl not in IMPLS:
        raise ValueError(f"moe impl={impl!r} is unknown; choose one of {tuple(IMPLS)}.")
    return IMPLS[impl]


def make_plan(experts: jax.Array, n_experts: int, impl: str, capacity_factor: float) -> Plan:
    """Dispatch plan of implementation `impl` for experts [B,T,P] (chosen expert ids)."""
    return get_impl(impl).plan(experts, n_experts, capacity_factor)


def dispatch(plan: Plan, rows: jax.Array, shared: bool) -> jax.Array:
    """Expert layout of rows ([A,Din] shared by a token's picks, or [A*P,Din]) for `plan`'s impl."""
    return IMPLS[plan.impl].dispatch(plan, rows, shared)


def combine(plan: Plan, y: jax.Array, shared: bool) -> jax.Array:
    """Inverse of `dispatch`: expert outputs -> [A*P,Dout] per assignment (dropped: zeros)."""
    return IMPLS[plan.impl].combine(plan, y, shared)


# --------------------------------------------------------------------------------------------- experts


def weighted_sum(gates: jax.Array, y: jax.Array) -> jax.Array:
    """sum_p gate * output: gates [A,P], y [A*P,D] -> [A,D]."""
    a, p = gates.shape
    return jnp.einsum("ap,apd->ad", gates.astype(y.dtype), y.reshape(a, p, -1))


class MoE(nn.Module):
    """x [B,T,D] -> [B,T,D]: top-k of E SwiGLU experts (each d_ff wide) per token."""

    # config.model.moe: impl capacity (gather dispatch, overflow dropped; the GPU path) | dropless (sort +
    # ragged_dot; the TPU path) | dense (all experts on all tokens; reference) | grouped (moe_groups.py)
    # | ragged (dropless, sorted and multiplied per device on FSDP-gathered experts: moe_ragged.py).
    # capacity_factor >= n_experts / top_k never drops. The router is fp32, N(0, router_init_std^2).
    # impl and capacity_factor only change execution, so they may change on resume.
    CONFIG_KEY = "moe"
    DEFAULTS = dict(n_experts=8, top_k=2, impl="capacity", capacity_factor=1.25, router_init_std=0.02)
    AUX_LOSSES = dict(moe_lb=0.01, moe_z=1e-3)
    RUNTIME_FIELDS = ("impl", "capacity_factor")
    METRICS = dict(moe_drop_rate="MoE")
    PARAM_GROUPS = ((("router",), "router"),)
    SHARDING_RULES = (
        ("router", None),
        ("act_expert", "expert"),
        ("act_capacity", None),
        ("act_group", ("data", "fsdp", "tensor")),  # rows of the grouped layout [E, B*C] (moe_groups.py)
        ("act_rows", ("data", "fsdp", "tensor", "expert")),  # token groups of 'ragged', one a device
    )

    d_ff: int
    linear: Any = Dense  # callable(features, kernel_axes, name=...) -> module (the linear slot)
    n_experts: int = 8
    top_k: int = 2
    impl: str = "capacity"
    capacity_factor: float = 1.25
    router_init_std: float = 0.02

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.asarray(x)  # NumPy inputs outside jit (gathers use jax.Array.at)
        b, t, d = x.shape
        impl = get_impl(self.impl)
        rows = x.reshape(b * t, d)  # [A,D]
        r = route(self, rows, self.n_experts, self.top_k, self.router_init_std, "moe")
        plan = impl.plan(r.experts.reshape(b, t, self.top_k), self.n_experts, self.capacity_factor)
        self.sow("stats", "moe_drop_rate", dispatch_lib.drop_rate(plan))
        h = impl.dispatch(plan, rows, shared=True)  # [E,C,D] | [A*P,D] | [E,A,D] | [E,B*C,D]
        proj = lambda name, f, axes, v: impl.project(
            self, self.linear, self.n_experts, f, axes, v, plan, name
        )
        h = jax.nn.silu(proj("gate", self.d_ff, ("embed", "mlp"), h)) * proj(
            "up", self.d_ff, ("embed", "mlp"), h
        )
        y = impl.combine(plan, proj("down", d, ("mlp", "embed"), h), shared=True)  # [A*P,D]
        return weighted_sum(r.gates, y).reshape(b, t, d)

    @staticmethod
    def from_config(m) -> dict:
        c = m.moe
        return dict(
            n_experts=c.n_experts,
            top_k=c.top_k,
            impl=c.impl,
            capacity_factor=c.capacity_factor,
            router_init_std=c.router_init_std,
        )

    @staticmethod
    def flops_per_token(m, seq_len: int) -> float:
        """ACTIVE forward FLOPs per token: the router plus top_k experts (3 D x F matmuls each)."""
        return 2.0 * m.d_model * m.moe.n_experts + m.moe.top_k * 3 * 2.0 * m.d_model * m.d_ff

    @staticmethod
    def validate(config) -> None:
        check_routing(config, "moe")


def check_routing(config, name: str) -> None:
    """Shared checks of config.model.moe / config.model.moa (raises ConfigError)."""

    c = config.model[name]
    where = f"model.{name}"
    if c.impl not in IMPLS:
        raise ConfigError(f"{where}.impl={c.impl!r} is not valid; choose one of {', '.join(IMPLS)}.")
    if c.n_experts < 1 or not 1 <= c.top_k <= c.n_experts:
        raise ConfigError(f"{where}: need 1 <= top_k ({c.top_k}) <= n_experts ({c.n_experts}).")
    if c.capacity_factor <= 0:
        raise ConfigError(f"{where}.capacity_factor must be > 0 (got {c.capacity_factor}).")
    if c.router_init_std <= 0:
        raise ConfigError(
            f"{where}.router_init_std must be > 0: an all-zero router makes top-k pick "
            "experts 0..k-1 for every token."
        )
    mesh_e = config.mesh.expert
    if mesh_e > 1 and c.n_experts % mesh_e:
        raise ConfigError(f"{where}.n_experts={c.n_experts} is not divisible by mesh.expert={mesh_e}.")
    if c.impl in ("dropless", "ragged") and config.model.linear != "dense":
        cls = registry.get("linear", config.model.linear)
        if not hasattr(cls, "ragged_dot"):
            raise ConfigError(
                f"{where}.impl={c.impl!r} needs {cls.__name__}.ragged_dot (grouped matmul of "
                f"stacked experts) for model.linear={config.model.linear!r}; use impl='capacity'."
            )
