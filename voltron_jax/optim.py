"""The optimizer: AdamW with parameter groups keyed on parameter paths, scheduled lr and weight decay.

    clip_by_global_norm(optim.grad_clip)  ->  scale_by_adam(b1, b2, eps)  ->  scale_by_groups:
    (moments stored in optim.moments_dtype: float32, or bfloat16 for pods short of HBM)
        update = -lr(step) * lr_mult[group] * (adam + wd(step) * decay[group] * param)

`lr(step)` and `wd(step)` are schedules of the GLOBAL step (voltron_jax/schedules.py). The step lives in
the optimizer state and starts at the phase's global start step, so a fresh optimizer (a phase built
by surgery) and a carried one (keep_optimizer) both see the global step; the lr is a traced scalar, so
resuming or branching never recompiles. Decay is decoupled AdamW (PyTorch/optax convention: scaled by
the group's lr).

Parameter groups (`param_labels`, first matching rule wins; names are the path components). First the
rules the selected slot classes declare (registry.Declared.param_groups: a run of path components ->
group), then the generic ones:
    gate       Infini-attention's gate ('core/beta')       lr optim.gate_lr (x schedule), no decay
    router     MoE/MoA 'router', MoD 'router' and 'predictor', logically >= 2-D   lr / w, no decay
               (1-D router vectors and biases there: 'vector')
    alpha      DenseFormer's 'dwa_weights'                  lr, decay iff optim.decay_alpha
    embedding  leaf named 'embedding'                       lr (/ w iff optim.mup_embed_lr), decay iff
               optim.decay_embed
    norm       leaf named 'scale', or under a name containing 'norm'   lr, no decay
    matrix     any other leaf that is logically >= 2-D (kernels, expert kernels)   lr / w, decay
    vector     everything else (biases, 1-D vectors)       lr, no decay
`w` is MiniCPM's width factor d_model / dim_model_base (1 when dim_model_base = 0), arXiv 2404.06395
(techniques-b.md 2.3): every 2-D tensor gets lr / w. Choices:
  - Embedding lr: MiniCPM scales it with the other 2-D tensors; textbook Adam-muP keeps it unscaled. It
    is unscaled unless optim.mup_embed_lr (the width sweep decides). A tied LM head is the embedding.
  - Embedding decay: off by default (BitNet FAQ, techniques-a.md 1.5; OLMo 2). The untied LM head is
    a matmul kernel: decayed and width-scaled like every other matrix.
  - Routers and the MoD predictor ride the (width-scaled) global lr without decay; the Infini gate beta
    gets its own lr with no decay (techniques-a.md 2.5); the MLP's 'gate' projection is a plain kernel,
    and a leaf named 'beta' is a gate only inside the Infini core of a model that selects it.
"Logically 2-D" ignores a leading scanned layers axis: for a boxed param (nn.Partitioned) the axis
named 'layers' is dropped; for a plain array under a path component 'blocks' (the scanned stack of
models/decoder.py run_stack) the leading axis is dropped. Params may be boxed or plain: both give the
same labels, and the optimizer accepts either.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from voltron_jax import recipe, registry, schedules
from voltron_jax.errors import ConfigError
from voltron_jax.models.decoder import width_factor

GROUPS = ("gate", "router", "alpha", "embedding", "norm", "matrix", "vector")
SCANNED_NAME = "blocks"  # path component of the scanned layer stack (decoder.run_stack)


def _is_box(x) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def path_names(path) -> tuple[str, ...]:
    """Dict keys / sequence indices of a tree path as strings (box attributes such as `.value` dropped)."""
    out = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            out.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            out.append(str(k.idx))
    return tuple(out)


def logical_ndim(names: tuple[str, ...], leaf) -> int:
    """ndim without a leading scanned 'layers' axis (see the module docstring)."""
    if isinstance(leaf, nn.Partitioned):
        return sum(n != "layers" for n in leaf.names)
    value = leaf.unbox() if _is_box(leaf) else leaf
    return len(value.shape) - (1 if SCANNED_NAME in names else 0)


def _contains(names: tuple[str, ...], run: tuple[str, ...]) -> bool:
    return any(names[i : i + len(run)] == run for i in range(len(names) - len(run) + 1))


def label(names: tuple[str, ...], ndim: int, slot_rules=()) -> str:
    """The group of the param at path `names` with logical rank `ndim`: the first slot rule whose path
    components occur in `names` (a 'router' of logical rank < 2 is a 'vector'), else the generic rules
    (module docstring)."""
    for run, group in slot_rules:
        if _contains(names, tuple(run)):
            return "vector" if group == "router" and ndim < 2 else group
    leaf = names[-1]
    if leaf == "embedding":
        return "embedding"
    if leaf == "scale" or any("norm" in n for n in names):
        return "norm"
    return "matrix" if ndim >= 2 else "vector"


def _labels_by_path(params, model_cfg=None) -> dict[tuple[str, ...], str]:
    slot_rules = registry.param_group_rules(model_cfg)
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_box)[0]
    out = {}
    for path, leaf in flat:
        names = path_names(path)
        out[names] = label(names, logical_ndim(names, leaf), slot_rules)
    return out


def param_labels(params, model_cfg=None) -> Any:
    """A tree like the (unboxed) params with each leaf replaced by its group name. `model_cfg`: the slot
    rules of the classes it selects (None: of every registered class)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_box)
    by_path = _labels_by_path(params, model_cfg)
    return jax.tree_util.tree_unflatten(treedef, [by_path[path_names(p)] for p, _ in flat])


def group_settings(config) -> dict[str, tuple[float, bool]]:
    """{group: (lr multiplier, weight decay on)} from config.optim and the model's width factor."""
    o = config.optim
    if o.gate_lr <= 0:
        raise ConfigError(f"optim.gate_lr={o.gate_lr} must be positive.")
    mup = 1.0 / width_factor(config.model)
    return {
        "gate": (o.gate_lr / o.lr, False),
        "router": (mup, False),
        "alpha": (1.0, bool(o.decay_alpha)),
        "embedding": (mup if o.mup_embed_lr else 1.0, bool(o.decay_embed)),
        "norm": (1.0, False),
        "matrix": (mup, True),
        "vector": (1.0, False),
    }


class GroupScheduleState(NamedTuple):
    """step: global step of the next update; lr, wd: values of the latest update (at init: the first)."""

    step: jax.Array
    lr: jax.Array
    wd: jax.Array


Rules = dict[tuple[str, ...], tuple[float, bool]]  # param path -> (lr multiplier, weight decay on)


def scale_by_groups(
    lr_fn: schedules.Schedule, wd_fn: schedules.Schedule, rules: Rules, start: int
) -> optax.GradientTransformation:
    """-lr(step) * mult * (u + wd(step) * decay * param) per leaf, (mult, decay) = rules[path].

    The global step starts at `start` (the phase's first step) and advances by one per update."""

    def init(params):
        del params
        s = jnp.asarray(start, jnp.int32)
        return GroupScheduleState(s, lr_fn(s), wd_fn(s))

    def update(updates, state, params=None):
        lr, wd = lr_fn(state.step), wd_fn(state.step)

        def one(path, u, p):
            names = path_names(path)
            if names not in rules:
                raise KeyError(
                    f"param {'/'.join(names)} is not in the tree make_optimizer was built for; "
                    "build the optimizer from this param tree."
                )
            mult, decay = rules[names]
            if decay:
                if p is None:
                    raise ValueError("weight decay needs the params: call tx.update(grads, state, params).")
                u = u + wd.astype(u.dtype) * p
            return (-lr * mult).astype(u.dtype) * u

        if params is None:
            out = jax.tree_util.tree_map_with_path(lambda path, u: one(path, u, None), updates)
        else:
            out = jax.tree_util.tree_map_with_path(one, updates, params)
        return out, GroupScheduleState(state.step + 1, lr, wd)

    return optax.GradientTransformation(init, update)


def make_optimizer(config, params, phase_name: str) -> optax.GradientTransformation:
    """AdamW for `params` (boxed or plain, concrete or abstract) in phase `phase_name` of the recipe."""
    o = config.optim
    if not (0.0 <= o.b1 < 1.0 and 0.0 <= o.b2 < 1.0 and o.eps > 0 and o.grad_clip >= 0):
        raise ConfigError(
            f"optim: need 0 <= b1, b2 < 1, eps > 0 and grad_clip >= 0 (0 = off); got "
            f"b1={o.b1}, b2={o.b2}, eps={o.eps}, grad_clip={o.grad_clip}."
        )
    settings = group_settings(config)
    rules = {path: settings[g] for path, g in _labels_by_path(params, config.model).items()}
    start = recipe.phase_start(config.recipe, phase_name, config.max_steps)
    lr_fn, wd_fn = schedules.lr_schedule(config, phase_name), schedules.wd_schedule(config)
    tail = scale_by_groups(lr_fn, wd_fn, rules, start)
    # grad_clip=0 (off) clips at infinity: the optimizer-state tree stays the same whether clipping is on
    # or off, so a resume may change it (a missing transform shifts the chain's state and breaks restore)
    parts = [optax.clip_by_global_norm(o.grad_clip if o.grad_clip > 0 else float("inf"))]
    if o.moments_dtype == "float32":
        adam = optax.scale_by_adam(o.b1, o.b2, o.eps)
    elif o.moments_dtype == "bfloat16":
        adam = scale_by_adam_stored(o.b1, o.b2, o.eps, jnp.bfloat16)
    else:
        raise ConfigError(
            f"optim.moments_dtype={o.moments_dtype!r} is not valid; choose float32 or bfloat16."
        )
    return optax.chain(*parts, adam, tail)


def scale_by_adam_stored(b1: float, b2: float, eps: float, dtype) -> optax.GradientTransformation:
    """optax.scale_by_adam with both moments STORED in `dtype` (bf16: half the optimizer memory); the
    update is computed in fp32 from the stored moments and the fp32 gradient. DeepSeek-V3 trains with
    bf16 AdamW moments without observable loss (arXiv 2412.19437, section 3.3.3). With b2 = 0.95 every
    step moves nu by 5% of the new term, well above bf16's 0.4% resolution (b2 = 0.999 would stall
    small increments). Same state type as optax (ScaleByAdamState), so checkpoints keep their layout."""

    def init(params):
        zeros = lambda p: jnp.zeros(jnp.shape(p), dtype)
        return optax.ScaleByAdamState(
            count=jnp.zeros([], jnp.int32), mu=jax.tree.map(zeros, params), nu=jax.tree.map(zeros, params)
        )

    def update(updates, state, params=None):
        del params
        f32 = lambda a: a.astype(jnp.float32)
        mu = jax.tree.map(lambda g, m: b1 * f32(m) + (1 - b1) * f32(g), updates, state.mu)
        nu = jax.tree.map(lambda g, n: b2 * f32(n) + (1 - b2) * jnp.square(f32(g)), updates, state.nu)
        count = state.count + 1
        c1, c2 = 1 - b1 ** f32(count), 1 - b2 ** f32(count)
        out = jax.tree.map(lambda m, n: (m / c1) / (jnp.sqrt(n / c2) + eps), mu, nu)
        store = lambda t: jax.tree.map(lambda a: a.astype(dtype), t)
        return out, optax.ScaleByAdamState(count=count, mu=store(mu), nu=store(nu))

    return optax.GradientTransformation(init, update)


def _schedule_state(opt_state) -> GroupScheduleState:
    leaves = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, GroupScheduleState))
    found = [x for x in leaves if isinstance(x, GroupScheduleState)]
    if len(found) != 1:
        raise ValueError("opt_state does not come from voltron_jax.optim.make_optimizer.")
    return found[0]


def current_lr(opt_state) -> jax.Array:
    """Base lr (before group multipliers) of the latest update; at init, of the first update."""
    return _schedule_state(opt_state).lr
