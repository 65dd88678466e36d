"""THE train loop: runs every phase of `config.recipe` in dependency order, each resumable on its own.

    run(config, workdir)
      for each phase (stable, decay, branch xN, mix, fine-tune ...):
        mesh + shardings -> model/optimizer shapes via jax.eval_shape -> init ladder
        (resume the phase folder | parents' checkpoints [+ surgery] | a HF checkpoint | scratch)
        -> loop (step, log, eval, save)

The loop never asks which technique is on: auxiliary losses are whatever the model sowed into the
'aux_loss' collection, weighted by `config.aux_weights[name]`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import zlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from flax import struct

from voltron_jax import losses, microbatch, optim, schedules, sharding, surgery
from voltron_jax import recipe as recipe_lib
from voltron_jax.config import phase_config, validate_mesh
from voltron_jax.data import orderings
from voltron_jax.errors import ConfigError, Diverged
from voltron_jax.losses import cross_entropy  # the reference loss; train.cross_entropy is public
from voltron_jax.models import decoder
from voltron_jax.run import checkpoint, complete, console, metrics, report, resume, runinfo, runlock, tracking
from voltron_jax.run import workdir as workdir_lib


class NonFiniteLoss(Diverged):
    """Training produced a NaN/inf loss; the last good checkpoint is left as it was."""


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


@dataclasses.dataclass
class Phase:
    """One runnable unit: a recipe phase, or one member of a fan-out phase."""

    name: str
    member: int | None
    config: ml_collections.ConfigDict  # the phase's own config (recipe overrides applied)
    directory: epath.Path
    start: int  # global step at which it starts
    steps: int

    @property
    def label(self) -> str:
        return self.name if self.member is None else f"{self.name}/{self.member}"


# ============================================================================ phases and folders


def phases(config, workdir: epath.Path) -> list[Phase]:
    """Every runnable phase in dependency order, with its folder (docs/design.md layout)."""
    out = []
    for folder, name in workdir_lib.phase_folders(recipe_lib.phase_order(config.recipe)).items():
        ph = config.recipe[name]
        base = workdir / folder
        members = range(ph.fan_out) if ph.fan_out else [None]
        for mem in members:
            out.append(
                Phase(
                    name,
                    mem,
                    phase_config(config, name),
                    workdir_lib.member_dir(base, mem),
                    recipe_lib.phase_start(config.recipe, name, config.max_steps),
                    recipe_lib.phase_steps(ph, config.max_steps),
                )
            )
    return out


def write_run_info(config, workdir: epath.Path, info: dict | None = None) -> dict:
    """Resolved config, git commit, package versions and the corpus manifest (`info`, collected when
    None): to disk, each file written whole or not at all, and returned. The loop calls it only once a
    restore or a first step has succeeded: config.json is the reference every later run is checked
    against (resume.py), so a run that cannot use the workdir must not rewrite it."""

    info = runinfo.collect(config) if info is None else info
    if jax.process_index() == 0:
        workdir_lib.write_json(workdir_lib.config_file(workdir), info["config"])
        workdir_lib.write_json(workdir_lib.run_info_file(workdir), info, default=str)
    return info


# ============================================================================ model, loss, steps


def model_loss(model, variables, inputs: tuple, batch: dict, loss_chunk: int, mutable=False):
    """(ce, z-loss) of the model on the batch, plus the mutable collections when `mutable` names some.
    loss_chunk > 0: the decoder returns its final hidden state and the LM head is applied in the loss,
    loss_chunk vocabulary columns at a time (voltron_jax/losses.py: no [B,T,V] logits); 0: full logits."""
    out = model.apply(variables, *inputs, mutable=mutable, return_hidden=loss_chunk > 0)
    y, cols = out if mutable else (out, {})
    if loss_chunk > 0:
        hidden, kernel = y
        stats = losses.head_cross_entropy(hidden, kernel, batch["targets"], batch["weights"], loss_chunk)
    else:
        stats = cross_entropy(y, batch["targets"], batch["weights"])
    return stats, cols


def sum_aux_losses(aux: dict, weights: ml_collections.ConfigDict) -> tuple[jax.Array, dict]:
    """Sum every sown aux loss times its configured weight; returns (total, {name: unweighted sum})."""
    by_name: dict[str, jax.Array] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(aux)[0]:
        name = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)][-1]
        by_name[name] = by_name.get(name, 0.0) + jnp.sum(leaf)
    unknown = sorted(set(by_name) - set(weights.keys()))
    if unknown:
        raise ConfigError(
            f"aux losses {unknown} have no weight; add them to aux_weights (known: {sorted(weights.keys())})."
        )
    total = sum((weights[k] * v for k, v in by_name.items()), jnp.zeros((), jnp.float32))
    return total, by_name


def mean_stats(stats: dict) -> dict[str, jax.Array]:
    """Mean of every sown 'stats' scalar by name over the sites that sowed it (layers, scanned blocks):
    e.g. {'moe_drop_rate': share of MoE assignments dropped, averaged over the MoE layers}."""
    by_name: dict[str, list] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(stats)[0]:
        name = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)][-1]
        by_name.setdefault(name, []).append(jnp.ravel(leaf).astype(jnp.float32))
    return {k: jnp.mean(jnp.concatenate(v)) for k, v in by_name.items()}


def model_inputs(batch: dict, doc_mask: bool) -> tuple:
    return batch["inputs"], batch["positions"], batch["segment_ids"] if doc_mask else None


def step_variables(params, state_tree, step) -> dict:
    """Model variables for one apply: params, plus every leaf of the 'state' collection (whatever
    module declared it, e.g. BitNet warm-in) set to the global step. The loop never asks who reads it."""
    if not state_tree:
        return {"params": params}
    return {"params": params, "state": jax.tree.map(lambda a: jnp.full(a.shape, step, a.dtype), state_tree)}


def make_train_step(
    model: nn.Module, tx: optax.GradientTransformation, config, lr_fn, state_tree=None, grad_shardings=None
):
    """(state, batch) -> (state, metrics); aux losses collected generically. With train.grad_accum_steps
    = N > 1 the batch is N microbatches scanned in the step (voltron_jax/microbatch.py), their gradients
    accumulated on `grad_shardings` (the params' shardings) before the one optimizer update."""
    doc_mask = config.data.doc_mask
    n_micro = config.train.grad_accum_steps

    def loss_fn(params, step, batch, token_share=1.0, batch_share=1.0):
        """This (micro)batch's loss, its token means scaled by `token_share` (its share of the step's
        weighted tokens) and its aux losses by `batch_share` (1/N): summed over the step's microbatches
        they are the step's loss and metrics."""
        (ce, zl), cols = model_loss(
            model,
            step_variables(params, state_tree, step),
            model_inputs(batch, doc_mask),
            batch,
            config.train.loss_chunk,
            mutable=["aux_loss", "intermediates", "stats"],
        )
        aux_total, aux = sum_aux_losses(cols.get("aux_loss", {}), config.aux_weights)
        ce, zl = ce * token_share, zl * token_share
        loss = ce + config.aux_weights.z_loss * zl + aux_total * batch_share
        stats = {k: v * batch_share for k, v in mean_stats(cols.get("stats", {})).items()}
        return loss, {
            "ce": ce,
            "z_loss": zl,
            **{f"aux/{k}": v * batch_share for k, v in aux.items()},
            **stats,
        }

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulated_grad(params, step, batch):
        total = jnp.maximum(jnp.sum(batch["weights"]), 1.0)  # cross_entropy's denominator for the step

        def micro_grad(params, mb):  # this microbatch's share of the step's loss and gradient
            share = jnp.maximum(jnp.sum(mb["weights"]), 1.0) / total
            return grad_fn(params, step, mb, share, 1.0 / n_micro)

        acc_dtype = microbatch.accumulator_dtype(config)
        return microbatch.accumulate(micro_grad, params, batch, n_micro, acc_dtype, grad_shardings)

    def step_fn(state: TrainState, batch):
        if n_micro == 1:
            (loss, parts), grads = grad_fn(state.params, state.step, batch)
        else:
            (loss, parts), grads = accumulated_grad(state.params, state.step, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        out = {
            "loss": loss,
            "grad_norm": optax.global_norm(grads),
            "lr": lr_fn(state.step),
            **parts,
            "nonfinite": (~jnp.isfinite(loss)).astype(jnp.int32),
        }
        return TrainState(state.step + 1, params, opt_state), out

    return step_fn


def make_probe_step(model: nn.Module, config, state_tree=None):
    """(params, step, batch) -> the model's sown 'intermediates' (e.g. mean router inputs), for surgery."""
    doc_mask = config.data.doc_mask

    def probe_fn(params, step, batch):
        _, cols = model.apply(
            step_variables(params, state_tree, step),
            *model_inputs(batch, doc_mask),
            mutable=["intermediates"],
        )
        return cols.get("intermediates", {})

    return probe_fn


def make_eval_step(model: nn.Module, config, state_tree=None):
    doc_mask = config.data.doc_mask

    def eval_fn(params, step, batch):
        """(summed token loss, token count, sown stats such as the MoE drop rate) of one batch."""
        variables = step_variables(params, state_tree, step)
        (ce, _), cols = model_loss(
            model,
            variables,
            model_inputs(batch, doc_mask),
            batch,
            config.train.loss_chunk,
            mutable=["stats"],
        )
        n = jnp.sum(batch["weights"])
        return ce * jnp.maximum(n, 1.0), n, mean_stats(cols.get("stats", {}))

    return eval_fn


def all_finite(tree) -> jax.Array:
    """True when every floating-point leaf of `tree` is finite (a checkpoint worth calling good)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


_all_finite = jax.jit(all_finite)


# ============================================================================ init ladder


class Runtime:
    """Everything compiled for one phase: mesh, model, optimizer, shardings and jitted functions."""

    def __init__(self, phase: Phase, devices=None):
        c = phase.config
        self.config, self.phase = c, phase
        self.mesh = sharding.make_mesh(c.mesh, devices)
        self.model = decoder.build_model(c.model)
        self.lr_fn = schedules.lr_schedule(c, phase.name)
        dummy = jnp.zeros((1, c.data.seq_len), jnp.int32)
        variables = jax.eval_shape(lambda k: self.model.init(k, dummy), jax.random.key(0))
        self.tx = optim.make_optimizer(c, variables["params"], phase.name)
        state_tree = variables.get("state")

        def init_state(key):
            params = self.model.init(key, dummy)["params"]
            return TrainState(jnp.asarray(phase.start, jnp.int32), params, self.tx.init(params))

        with sharding.context(self.mesh):
            boxed = jax.eval_shape(init_state, jax.random.key(0))
            self.shardings = sharding.tree_shardings(self.mesh, boxed)
            self.abstract = jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                sharding.unboxed(boxed),
                self.shardings,
            )
            self._init = jax.jit(
                sharding.traced_in(self.mesh, lambda k: nn.unbox(init_state(k))), out_shardings=self.shardings
            )
            batch_sh = sharding.batch_sharding(self.mesh)
            self.train_step = jax.jit(
                sharding.traced_in(
                    self.mesh,
                    make_train_step(self.model, self.tx, c, self.lr_fn, state_tree, self.shardings.params),
                ),
                in_shardings=(self.shardings, batch_sh),
                out_shardings=(self.shardings, None),
                donate_argnums=0,
            )
            self.eval_step = jax.jit(
                sharding.traced_in(self.mesh, make_eval_step(self.model, c, state_tree)),
                in_shardings=(self.shardings.params, self.shardings.step, batch_sh),
            )
            self.probe_step = jax.jit(  # compiled only if a surgery asks (centroid router init)
                sharding.traced_in(self.mesh, make_probe_step(self.model, c, state_tree)),
                in_shardings=(self.shardings.params, self.shardings.step, batch_sh),
                out_shardings=sharding.replicated(self.mesh),  # readable on every host
            )

    def scratch(self) -> TrainState:
        return self._init(jax.random.key(self.config.seed))

    def place(self, params, opt_state=None) -> TrainState:
        """Put host/other-mesh params (and optionally optimizer state) onto this phase's shardings."""
        params = jax.device_put(params, self.shardings.params)
        if opt_state is None:
            opt_state = jax.jit(self.tx.init, out_shardings=self.shardings.opt_state)(params)
        else:
            opt_state = jax.device_put(opt_state, self.shardings.opt_state)
        return TrainState(
            jax.device_put(jnp.asarray(self.phase.start, jnp.int32), self.shardings.step), params, opt_state
        )


def restore_final(phase: Phase, target) -> tuple[TrainState, dict]:
    """(state, meta) of a finished phase's last checkpoint, restored onto `target`'s shardings."""
    ck = checkpoint.Checkpointer(workdir_lib.ckpt_dir(phase.directory))
    try:
        if ck.latest_step() is None:
            raise checkpoint.CheckpointError(
                f"phase {phase.label} has no checkpoint in {phase.directory}; run that phase first."
            )
        state, _, meta = ck.restore(target=target)  # the final state: a damaged one raises, no fallback
    finally:
        ck.close()
    return state, meta


def restore_host(phase: Phase) -> tuple[Any, dict]:
    """(params on the host, meta) of a finished phase, restored with its own model's shapes."""
    state, meta = restore_final(phase, Runtime(phase).abstract)
    return jax.device_get(state.params), meta


def data_seed(config, name: str, member: int | None) -> int:
    """Shuffle seed of the training data of phase `name` (fan-out member or data cluster `member`).

    A function of (config.seed, name, member) only: a phase's data order must not depend on the other
    phases of the recipe. (It once used the phase's index in config.recipe.keys(), which ConfigDict
    sorts by name, so the recipe's later phases moved the 'stable' data of the c-BTX recipe and its
    dense ':continue' baseline apart.)
    """
    key = f"{int(config.seed)}/{name}/{-1 if member is None else int(member)}"
    return zlib.crc32(key.encode())  # 32 bits, the same in every process (unlike hash())


def make_probe(rt: Runtime, phase: Phase, sources: list[Phase]):
    """A surgery.Probe: runs host params on this phase's mesh over TRAINING batches of the cluster that
    source i trained on (source i is fan-out member i, which trained on cluster i)."""
    from voltron_jax.data import pipeline  # lazy: the data stack

    c = rt.config
    step = jax.device_put(jnp.asarray(phase.start, jnp.int32), rt.shardings.step)

    def forward(host_params):
        params = jax.device_put(host_params, rt.shardings.params)  # placed once for all batches

        def run(batch: dict) -> dict:
            batch = sharding.host_batch_to_global(rt.mesh, batch)
            return jax.device_get(rt.probe_step(params, step, batch))

        return run

    def batches(i: int):
        cluster = sources[i].member
        if cluster is None:
            raise surgery.SurgeryError(f"source {sources[i].label} is not a fan-out member: no data cluster.")
        return pipeline.make_train_iterator(
            c,
            "cluster",
            seed=data_seed(c, phase.name, cluster),
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            cluster=cluster,
        )

    return surgery.Probe(forward, batches)


def parent_identity(config, all_phases: list[Phase], phase: Phase) -> dict[str, dict]:
    """{parent label: {'step', 'ckpt'}} of the finished checkpoints `phase` is built from (its parents,
    plus the seed with surgery.seed_expert). ConfigError naming the parent when one is unfinished: a
    phase is never built from a parent that has not reached its last step."""
    ph = config.recipe[phase.name]
    names = set(recipe_lib.parents(ph))
    if ph.init.surgery and phase.config.surgery.seed_expert:
        names.add(recipe_lib.seed_phase(config.recipe, phase.name))
    out = {}
    for p in all_phases:
        if p.name not in names:
            continue
        ck = checkpoint.Checkpointer(workdir_lib.ckpt_dir(p.directory))
        try:
            step = ck.latest_step()
        finally:
            ck.close()
        end = p.start + p.steps
        if step is None or step < end:
            at = "has no checkpoint" if step is None else f"is unfinished (step {step} of {end})"
            raise ConfigError(
                f"phase {phase.label} starts from {p.label}, which {at}; run {p.label} first (the whole "
                f"recipe without --only_phase, or --only_phase={p.name})."
            )
        out[p.label] = {"step": int(step), "ckpt": str(ck.directory)}
    return out


def check_parents(config, all_phases: list[Phase], phase: Phase) -> None:
    """Refuse (one line) to resume a phase whose parents changed since it was built from them (their
    steps or max_steps were raised, or they were retrained) or are unfinished now: its checkpoints
    continue a state the recipe no longer describes."""
    if not recipe_lib.parents(config.recipe[phase.name]):
        return  # a phase from scratch
    move = (
        f"move {phase.directory} aside (e.g. rename it to {phase.directory.name}.stale) and rerun to "
        "rebuild it from its parents; or set the parents' steps and max_steps back."
    )
    with contextlib.closing(checkpoint.Checkpointer(workdir_lib.ckpt_dir(phase.directory))) as ck:
        latest = ck.latest_step()
    if latest is not None and latest < phase.start:  # also for phases built before parents.json existed
        raise ConfigError(
            f"phase {phase.label}'s newest checkpoint (global step {latest}) lies before its start (step "
            f"{phase.start}): its parents' steps or max_steps changed since it was built. To continue, {move}"
        )
    f = workdir_lib.parents_file(phase.directory)
    if not f.exists():
        return  # built before parents were recorded
    try:
        built_from = json.loads(f.read_text())
    except ValueError as e:
        raise ConfigError(
            f"{f} is not readable JSON ({e}); restore it or move {phase.directory} aside."
        ) from e
    now = parent_identity(config, all_phases, phase)
    changed = [
        f"{label} step {old.get('step')} -> {now[label]['step'] if label in now else 'absent'}"
        for label, old in built_from.items()
        if now.get(label, {}).get("step") != old.get("step")
    ]
    if changed:
        raise ConfigError(
            f"phase {phase.label} was built from parents that changed since ({'; '.join(changed)}): its "
            f"checkpoints continue stale parents. To rebuild it from the new parents, {move}"
        )


def init_from_parents(rt: Runtime, config, all_phases: list[Phase], phase: Phase) -> TrainState:
    """A phase's first state from its parents' final checkpoints: resharded onto this phase's mesh, or
    (with `init.surgery`) mapped on the host by the named surgery function first. Sources keep the
    recipe's order (fan-out members 0..N-1: branch i -> expert i); with surgery.seed_expert the phase
    the branches started from (recipe_lib.seed_phase) comes last. A fan-out phase whose parent is a
    fan-out phase continues it member by member (e.g. each c-BTM branch's own decay)."""
    ph = config.recipe[phase.name]
    sources = [p for p in all_phases if p.name in recipe_lib.parents(ph)]
    if phase.member is not None and all(p.member is not None for p in sources):
        sources = [p for p in sources if p.member == phase.member]  # fan-out from fan-out: member i from i
    if not ph.init.surgery:
        ((src_state, _),) = [restore_final(p, rt.abstract) for p in sources]
        return rt.place(src_state.params, src_state.opt_state if ph.init.keep_optimizer else None)

    params, metas = zip(*[restore_host(p) for p in sources], strict=True)
    seed = None
    if rt.config.surgery.seed_expert:
        (seed_src,) = [p for p in all_phases if p.name == recipe_lib.seed_phase(config.recipe, phase.name)]
        seed, _ = restore_host(seed_src)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), rt.abstract.params)
    merged = surgery.apply(
        ph.init.surgery,
        list(params),
        target,
        config=rt.config,
        sources_meta=list(metas),
        key=jax.random.key(config.seed),
        seed_params=seed,
        probe=make_probe(rt, phase, sources),
    )
    return rt.place(merged)


def init_from_hf(rt: Runtime, path: str) -> TrainState:
    """A phase's first state from a Hugging Face checkpoint folder (init.from_='hf:/path'): its weights
    checked against the phase's model, a fresh optimizer state (voltron_jax/interop/hf_import.py)."""
    from voltron_jax.interop import hf_import  # lazy: the optional extra [interop] (transformers, torch)

    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), rt.abstract.params)
    return rt.place(hf_import.load_params(path, rt.config.model, target))


# ============================================================================ the loop


def evaluate(rt: Runtime, state: TrainState, batches: list[dict]) -> dict[str, float]:
    """Token-weighted loss and perplexity over `batches`, plus each sown stat's mean over the batches
    (an MoE's drop rate: capacity is shared by a batch's rows, so it depends on the eval batch size)."""
    tot, n, stats = 0.0, 0.0, {}
    for b in batches:
        s, c, st = rt.eval_step(state.params, state.step, sharding.host_batch_to_global(rt.mesh, b))
        tot, n = tot + float(s), n + float(c)
        for k, v in st.items():
            stats.setdefault(k, []).append(float(v))
    loss = tot / n if n > 0 else float("nan")  # no scored token: no loss to report (never 0.0)
    return {
        "loss": loss,
        "perplexity": float(np.exp(min(loss, 50.0))),
        **{k: float(np.mean(v)) for k, v in stats.items()},
    }


_SKIP_NOTED: set[str] = set()


def eval_sets(c, pid: int, pcount: int) -> dict[str, list[dict]]:
    """Validation batches: the pretraining mixture, plus each data cluster with train.eval_clusters.

    A cluster with less than one row (data.seq_len+1 tokens) of validation text routed to it gets no
    set (its metrics are absent, '-' in the report), never the whole split's loss under its name.
    """
    from voltron_jax.data import pipeline  # lazy: the data stack

    sets = {"": pipeline.make_eval_batches(c, "pretrain", c.train.eval_batches, pid, pcount)}
    if c.train.eval_clusters:
        for j in range(c.data.n_clusters):
            if pipeline.cluster_validation_rows(c, j) == 0:
                msg = (
                    f"cluster_{j}: no per-cluster validation (less than data.seq_len+1="
                    f"{c.data.seq_len + 1} tokens of validation text routed to it; raise data.val_fraction)"
                )
                if msg not in _SKIP_NOTED:
                    _SKIP_NOTED.add(msg)
                    print(msg, flush=True)
                continue
            sets[f"cluster_{j}/"] = pipeline.make_eval_batches(
                c, "cluster", c.train.eval_batches, pid, pcount, cluster=j
            )
    return sets


def evaluate_all(rt: Runtime, state: TrainState, sets: dict[str, list[dict]]) -> dict[str, float]:
    out = {}
    for prefix, batches in sets.items():
        out.update({prefix + k: v for k, v in evaluate(rt, state, batches).items()})
    return out


def run_phase(
    config,
    workdir: epath.Path,
    phase: Phase,
    all_phases: list[Phase],
    info: dict,
    rt: Runtime,
    on_ready=lambda: None,
) -> dict:
    """Run (or resume, or skip if finished) one phase with its compiled runtime `rt` (fan-out members
    share one); returns its final validation metrics. `on_ready()` is called once the phase's state is
    proven usable: after a restore or an init from parents succeeded, or after the first step from
    scratch (train.run writes config.json then).

    Every exit (done, NaN, SIGTERM, Ctrl-C, any exception) settles the checkpoint save in flight: it is
    waited for (committed) before the error propagates, never dropped at interpreter shutdown."""
    c = phase.config
    phase.directory.mkdir(parents=True, exist_ok=True)
    ck = checkpoint.Checkpointer(
        workdir_lib.ckpt_dir(phase.directory), keep=c.train.keep, async_save=c.train.async_save
    )
    try:
        final = _run_phase(config, phase, all_phases, info, rt, ck, on_ready)
    except BaseException:
        with contextlib.suppress(Exception):  # the error in flight is the one to report
            ck.close()  # waits for the save in flight: it commits, or fails and leaves no step
        raise
    ck.close()
    end = phase.start + phase.steps
    if jax.process_index() == 0 and complete.latest_committed(phase.directory) == end:
        complete.seal(phase.directory, end)  # a rerun of the finished phase now answers in seconds
    return final


def _last_good(ck: checkpoint.Checkpointer) -> str:
    """'the last good checkpoint (step N) is intact in <ckpt>' or, with none, what a rerun does."""
    with contextlib.suppress(Exception):
        ck.wait()  # a save in flight is part of what is intact
    last = ck.latest_step()
    if last is None:
        return f"no checkpoint of this phase was saved yet in {ck.directory} (a rerun starts it again)"
    return f"the last good checkpoint (step {last}) is intact in {ck.directory}"


def _run_phase(config, phase, all_phases, info, rt, ck, on_ready) -> dict:
    from voltron_jax.data import pipeline, prefetch  # lazy: the data stack

    c = phase.config
    pid, pcount = jax.process_index(), jax.process_count()
    with console.Stage(phase.label, "preparing the training data"):
        data = pipeline.make_train_iterator(
            c,
            config.recipe[phase.name].mixture,
            seed=data_seed(c, phase.name, phase.member),
            process_index=pid,
            process_count=pcount,
            cluster=phase.member,
        )
    end = phase.start + phase.steps

    # ---- init ladder: resume this folder | parents (+ surgery) | Hugging Face checkpoint | scratch
    ready = False
    if ck.latest_step() is not None:
        check_parents(config, all_phases, phase)  # built from parents that changed since: refuse
        # a damaged newest step is moved aside and the newest clean one resumes (checkpoint.py)
        with console.Stage(phase.label, f"restoring step {ck.latest_step()}"):
            state, data_state, _ = ck.restore(target=rt.abstract, fallback=True)
        data.set_state(data_state)
        print(f"[{phase.label}] resumed at step {int(state.step) - phase.start}/{phase.steps}", flush=True)
        ready = True
    elif recipe_lib.parents(config.recipe[phase.name]):
        built_from = parent_identity(config, all_phases, phase)  # unfinished parents: refuse
        with console.Stage(phase.label, "initialising from " + ", ".join(built_from)):
            state = init_from_parents(rt, config, all_phases, phase)
        if jax.process_index() == 0:
            workdir_lib.write_json(workdir_lib.parents_file(phase.directory), built_from)
        ready = True
    elif recipe_lib.hf_source(config.recipe[phase.name]):
        state = init_from_hf(rt, recipe_lib.hf_source(config.recipe[phase.name]))
        ready = True
    else:
        state = rt.scratch()
    if ready:
        on_ready()
    meta = {**info, "phase": phase.label, "config": c.to_dict()}
    # the steps each phase runs beside the configured recipe.<phase>.steps (max_steps caps them)
    meta["steps_run"] = {n: recipe_lib.phase_steps(config.recipe[n], config.max_steps) for n in config.recipe}

    with console.Stage(phase.label, "preparing the validation data"):
        eval_batches = eval_sets(c, pid, pcount)
    probe = eval_batches[""][0] if eval_batches[""] else None  # judges a checkpoint's loss before saving
    # records past the restored step (a run killed after its last checkpoint) are dropped: one curve
    writer = metrics.MetricWriter(
        phase.directory,
        phase.label,
        phase.steps,
        phase.start,
        int(state.step),
        tracker=tracking.make(c, phase.directory, phase.label),  # W&B when train.wandb_project is set
    )
    tokens_per_step = c.data.batch_size * c.data.seq_len
    flops_per_step = 3 * decoder.flops_per_token(c.model, c.data.seq_len) * tokens_per_step
    peak = metrics.peak_flops_per_device(c.train.peak_flops) * jax.device_count()

    # the next batches are built and put on the devices while a step runs; feed.state is the data
    # position after the batches the loop took, the one a checkpoint must hold (data/prefetch.py)
    feed = prefetch.Prefetcher(data, lambda b: sharding.host_batch_to_global(rt.mesh, b), c.train.prefetch)

    def not_good(state) -> str:
        """Why `state` is no good checkpoint ('' if it is): its parameters, and the loss they give on a
        validation batch, must be finite (a finite loss before a diverging update proves nothing)."""
        if not bool(_all_finite(state.params)):
            return "its parameters are not finite"
        if probe is not None:
            s, _, _ = rt.eval_step(state.params, state.step, sharding.host_batch_to_global(rt.mesh, probe))
            if not np.isfinite(float(s)):
                return "the loss its parameters give is not finite"
        return ""

    def save(step, force=False):
        why = not_good(state)
        if why:
            raise NonFiniteLoss(
                f"[{phase.label}] diverged: the state at step {step} is not saved ({why}); "
                f"{_last_good(ck)}. Lower optim.lr, raise schedule.warmup or check the data."
            )
        ck.save(step, state, feed.state, meta, force=force)

    step = int(state.step)
    if step == phase.start and phase.steps == 0 and ck.latest_step() is None:
        save(step, force=True)  # e.g. a merge phase: its product is the checkpoint
    window, t_window = [], time.time()
    compiling = console.Stage(phase.label, "compiling the train step") if step < end else None
    compile_s, untimed, tracing = 0.0, 0, False
    try:
        with feed, checkpoint.PreemptionGuard() as guard:
            while step < end:
                batch = next(feed)
                if step == c.train.profile_step:  # profile_steps steps' trace: TensorBoard's Profile tab
                    jax.profiler.start_trace(str(workdir_lib.tb_dir(phase.directory)))
                    tracing = True
                state, m = rt.train_step(state, batch)
                if compiling is not None:  # the first step's time is its compile: said, not silent
                    jax.block_until_ready(m["loss"])
                    compile_s, compiling = compiling.done(), None
                    t_window, untimed = time.time(), 1  # throughput from the second step on
                if tracing and (step + 1 >= c.train.profile_step + c.train.profile_steps or step + 1 == end):
                    jax.block_until_ready(m["loss"])
                    jax.profiler.stop_trace()
                    tracing = False
                step += 1
                if not ready:  # the first step from scratch ran: the config is proven
                    jax.block_until_ready(m["loss"])
                    on_ready()
                    ready = True
                ck.check()  # a failed async save stops the run at the next step, not at the next save
                window.append(m)
                boundary = step % c.train.log_every == 0 or step == end
                saving = step % c.train.ckpt_every == 0 or step == end
                if boundary or saving:
                    avg = {k: float(np.mean([float(x[k]) for x in window])) for k in window[0]}
                    if avg.pop("nonfinite") > 0:
                        raise NonFiniteLoss(
                            f"[{phase.label}] non-finite loss before step {step}; {_last_good(ck)}. "
                            "Lower optim.lr, raise schedule.warmup or check the data."
                        )
                    timed = len(window) - untimed
                    dt = (time.time() - t_window) / timed if timed else compile_s
                    untimed = 0
                    avg.update(
                        tokens_per_s=tokens_per_step / dt,
                        step_time_s=dt,
                        mfu=flops_per_step / dt / peak if peak else 0.0,
                        **metrics.device_memory(),
                    )
                    writer.write(step, avg)
                    writer.progress(step, avg)
                    window, t_window = [], time.time()
                if step % c.train.eval_every == 0 and step < end:
                    with console.Stage(phase.label, f"evaluating at step {step - phase.start}"):
                        writer.write(step, evaluate_all(rt, state, eval_batches), kind="eval")
                if saving:
                    save(step)
                if boundary or saving:
                    t_window = time.time()  # throughput windows exclude eval and checkpoint time
                if guard.should_stop(step):
                    save(step, force=True)
                    ck.wait()
                    raise SystemExit(
                        f"[{phase.label}] preempted: saved step {step}; rerun the same command to resume."
                    )
        if not ready:  # a finished phase with nothing to train (e.g. rerun of a 0-step phase)
            on_ready()
        with console.Stage(phase.label, "final evaluation"):
            final = evaluate_all(rt, state, eval_batches)
        writer.write(step, final, kind="eval")
    finally:
        writer.close()
    drops = report.format_drop_rates(report.mean_drop_rates([final]))
    drops = f"  dropped {drops}" if drops != "-" else ""
    print(
        f"[{phase.label}] done: validation loss {final['loss']:.4f}  perplexity {final['perplexity']:.3f}"
        + drops,
        flush=True,
    )
    with console.Stage(phase.label, "finishing the last checkpoint save"):
        ck.wait()
    return final


def check_workdir(workdir: str) -> epath.Path:
    """The workdir as an absolute path (or bucket URL), created and proven writable."""
    path = workdir_lib.path(workdir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe.{jax.process_index()}"  # hosts may share the folder
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"workdir {workdir!r} is not writable ({e}); pass a --workdir you can write "
            "to (local path or bucket URL)."
        ) from e
    return path


def check_data_specs(config) -> None:
    """Every phase's training mixture (and the validation mixture) parses and names known tasks, checked
    before the first step of any phase: a typo only a later phase uses must not surface after the earlier
    phases trained. Call after data preparation (which registers the prepared tasks)."""
    from voltron_jax.data import corpus, pipeline, tasks  # lazy: the data stack

    known = set(tasks.registered())
    uses = [(name, config.recipe[name].mixture) for name in recipe_lib.phase_order(config.recipe)]
    for name, mixture in [*uses, ("<validation>", "pretrain")]:
        if mixture in ("cluster", "passkey"):
            continue
        pc = phase_config(config, name) if name in config.recipe else config
        where = f"recipe.{name}.mixture={mixture!r}" if name in config.recipe else "the validation mixture"
        try:
            entries = pipeline.resolve_mixture(pc, mixture)
        except corpus.DataError as e:
            raise ConfigError(f"{where}: {e}") from e
        for task, _ in entries:
            if task in tasks.BUILTIN or task.startswith("tfds:") or tasks.task_name(task) in known:
                continue
            raise ConfigError(
                f"{where}: unknown data task {task!r} (spec {pc.data.mixtures.get(mixture, mixture)!r}); "
                f"known: {sorted(tasks.BUILTIN)}, 'tfds:<name>' or a prepared task. Fix the mixture; "
                "nothing was trained."
            )


def needs_prepare(config) -> bool:
    """ICP ordering and cluster-routed phases read the outputs of `voltron_jax.data.prepare`."""
    cluster_phases = any(config.recipe[n].mixture == "cluster" for n in config.recipe)
    return orderings.get(config.data.ordering).needs_prepare or cluster_phases


def run(
    config: ml_collections.ConfigDict, workdir: str, only_phase: str = "", member: int = -1
) -> dict[str, dict]:
    """Check the run (resume.check_run), prepare data if the recipe needs it, then run every phase in
    dependency order (or just `only_phase`, e.g. one c-BTX branch as its own job with `member`).
    Returns {phase label: metrics}."""
    return run_checked(resume.check_run(config, workdir, only_phase, member))


def run_checked(checked: resume.CheckedRun) -> dict[str, dict]:
    """`run` for a run that resume.check_run accepted (main checks before JAX starts): adds the device
    checks, then trains. The workdir's run lock (runlock.py; a phase job locks its phase or member) is
    held from before the first write to the end; an overlapping second run raises errors.RunLocked."""
    config, only_phase, member = checked.config, checked.only_phase, checked.member
    for name in recipe_lib.phase_order(config.recipe):
        validate_mesh(phase_config(config, name), jax.device_count())
    console.say(console.banner_line(config))
    root = check_workdir(checked.root)
    scope = "" if not only_phase else only_phase if member == -1 else f"{only_phase}.{member}"
    with runlock.RunLock(root, scope):  # fan-out members run side by side: each locks its part
        done = complete.finished(config, root, only_phase, member)  # a rerun of a finished run: seconds
        if done is not None:
            return complete.report_finished(config, root, done, only_phase)
        return _run_locked(config, root, only_phase, member)


def _run_locked(config: ml_collections.ConfigDict, root: epath.Path, only_phase: str, member: int) -> dict:
    info = runinfo.collect(config)
    resume.check_corpus(root, info["corpus_manifest"])  # the documents the checkpoints read: unchanged
    if needs_prepare(config):
        from voltron_jax.data import prepare  # lazy: the data stack

        with console.Stage("run", "preparing data (data/prepare.py)"):
            prepare.prepare(config, root)  # idempotent: reuses <workdir>/data when the config is unchanged
    check_data_specs(config)  # a typo in a later phase's mixture fails before the first step
    written = []

    def on_ready():  # config.json only once a restore or a first step proved this config works here
        if not written:
            write_run_info(config, root, info)
            written.append(True)

    todo = phases(config, root)
    selected = [p for p in todo if not only_phase or (p.name == only_phase and member in (-1, p.member))]
    if only_phase and not selected:
        raise ConfigError(f"phase {only_phase!r} has no member {member}.")
    results, rt = {}, None
    for ph in selected:
        if rt is None or rt.phase.name != ph.name:  # fan-out members reuse one compiled runtime
            rt = Runtime(ph)
            console.say(console.phase_line(ph.name, rt.config, rt.abstract.params))
        results[ph.label] = run_phase(config, root, ph, todo, info, rt, on_ready)
    if jax.process_index() == 0 and not only_phase:
        report.write(root, results, config.data.n_clusters if config.train.eval_clusters else 0)
    return results
