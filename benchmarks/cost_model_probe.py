"""Which ops does libtpu's cost model misprice? A table of op -> optimal_seconds, AOT-compiled for a TPU
topology on this (CPU) host.

    python benchmarks/cost_model_probe.py [--topology=v5p:2x2x1] [--only=moe,mod] [--json=out.jsonl]

libtpu prices some scatters at a sentinel of exactly -2.0 s (docs/results.md, "MoD: libtpu's cost model
returns negative seconds"), which makes `launch/aot_compile.py --estimate` negative for any step that
holds one. This compiles, each alone on one device of the topology with tiny shapes (a few seconds each):
  - the forward + backward of one routed layer: MoE (impl capacity, grouped, dropless), MoA (capacity,
    grouped) and MoD (dispatch gather, onehot);
  - the index-building and row-moving ops those layers are made of (plans, top-k, gathers, scatters).
A row whose optimal_seconds is near a negative multiple of 2 holds the sentinel; a correctly priced
tiny op costs 1e-8 .. 1e-5 s. These are the compiler's cost-model figures, never measurements.
No seqio/TensorFlow imports.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from launch.aot_compile import cost_of, topology_devices  # noqa: E402
from voltron_jax.models import dispatch, mod, moe  # noqa: E402
from voltron_jax.models.moa import MixtureOfAttention  # noqa: E402

B, T, D, F, E, P = 2, 64, 128, 256, 8, 2  # batch, sequence, model, expert ffn, experts, top-k


def compile_seconds(fn: Callable, args: tuple, device) -> float:
    """libtpu's optimal_seconds of jit(fn) on abstract copies of `args`, compiled for one device."""
    sh = NamedSharding(Mesh(np.array([device]), ("x",)), PartitionSpec())
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), args)
    return cost_of(jax.jit(fn).lower(*abstract).compile())["optimal_seconds"]


def layer_grad(module: nn.Module, *inputs) -> tuple[Callable, tuple]:
    """(fn, args): the gradient of sum(module(*inputs)^2) w.r.t. its params and first input."""
    params = jax.eval_shape(lambda: nn.unbox(module.init(jax.random.key(0), *inputs))["params"])

    def loss(p, x, *rest):
        y, _ = module.apply({"params": p}, x, *rest, mutable=True)
        return jnp.sum(y.astype(jnp.float32) ** 2)

    return jax.grad(loss, argnums=(0, 1)), (params, *inputs)


def mod_factory():
    """The block factory the decoder hands MoD (a tiny dense block, D wide)."""
    from configs import tiny
    from voltron_jax.models import decoder

    c = tiny.get_config("test")
    c.model.update(n_layers=2, d_model=D, n_heads=2, n_kv_heads=2, d_ff=F, routing="mod")
    return decoder.build_model(c.model).stack.keywords["layers"][1].keywords["make_block"]


def layers() -> dict[str, Callable[[], tuple]]:
    """Probes of one routed layer's forward + backward, by name (built lazily)."""
    x = jnp.zeros((B, T, D), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    out = {}
    for impl in ("capacity", "grouped", "dropless"):
        out[f"moe layer fwd+bwd ({impl})"] = lambda impl=impl: layer_grad(moe.MoE(F, impl=impl), x)
    for impl in ("capacity", "grouped", "dropless"):
        out[f"moa layer fwd+bwd ({impl})"] = lambda impl=impl: layer_grad(
            MixtureOfAttention(2, 2, 32, impl=impl), x, pos
        )
    for how in ("gather", "onehot"):
        out[f"mod layer fwd+bwd ({how})"] = lambda how=how: layer_grad(
            mod.MoDRouting(make_block=mod_factory(), dispatch=how), x, pos
        )
    return out


def ops() -> dict[str, Callable[[], tuple]]:
    """Probes of the isolated ops the routed layers are built from."""
    ex = jnp.zeros((B, T, P), jnp.int32)  # expert ids
    a = B * T * P
    c = dispatch.capacity(B * T, P, E, 1.25)
    slot = jnp.zeros((a,), jnp.int32)
    rows = jnp.zeros((B * T, D), jnp.float32)
    logits = jnp.zeros((B * T, E), jnp.float32)
    k = T // 8
    idx = jnp.zeros((B, k), jnp.int32)
    xb = jnp.zeros((B, T, D), jnp.float32)
    vals = jnp.zeros((B, k, D), jnp.float32)
    fwd, bwd = jnp.zeros((E * c,), jnp.int32), jnp.zeros((a,), jnp.int32)

    def plan(impl):
        return lambda e: moe.IMPLS[impl].plan(e, E, 1.25)[3:5]

    def grad(f):
        return jax.grad(lambda v, *r: jnp.sum(f(v, *r) ** 2))

    return {
        "elementwise a*2+1": lambda: (lambda v: v * 2 + 1, (rows,)),
        "capacity plan": lambda: (plan("capacity"), (ex,)),
        "grouped plan": lambda: (plan("grouped"), (ex,)),
        "dropless plan": lambda: (plan("dropless"), (ex,)),
        "1-D scatter set (.at[slot].set, drop)": lambda: (
            lambda s: jnp.full((E * c,), a, jnp.int32).at[s].set(jnp.arange(a, dtype=jnp.int32), mode="drop"),
            (slot,),
        ),
        "batched 1-D scatter set (vmap over B)": lambda: (
            jax.vmap(lambda s: jnp.full((E * c,), a, jnp.int32).at[s].set(jnp.arange(s.size), mode="drop")),
            (slot.reshape(B, -1),),
        ),
        "bincount": lambda: (lambda s: jnp.bincount(s, length=E), (slot,)),
        "argsort (stable)": lambda: (lambda s: jnp.argsort(s, stable=True), (slot,)),
        "top_k fwd+bwd": lambda: (grad(lambda v: jax.lax.top_k(v, P)[0]), (logits,)),
        "gather_rows fwd+bwd (custom VJP)": lambda: (
            grad(lambda v, f, b: dispatch.gather_rows(v, f, b, P)),
            (rows, fwd, bwd),
        ),
        "take_along_axis [B,T]->[B,C] fwd+bwd": lambda: (
            grad(lambda v, i: jnp.take_along_axis(v, i, axis=1)),
            (logits.reshape(B, -1)[:, :T], idx),
        ),
        "mod.membership": lambda: (lambda i: mod.membership(i, T), (idx,)),
        "mod.scatter_rows gather fwd+bwd": lambda: (
            grad(lambda v, i, u: mod.scatter_rows(v, i, u, False)),
            (xb, idx, vals),
        ),
        "mod.scatter_rows onehot fwd+bwd": lambda: (
            grad(lambda v, i, u: mod.scatter_rows(v, i, u, True)),
            (xb, idx, vals),
        ),
        "dispatch.invert (sort + searchsorted)": lambda: (lambda s: dispatch.invert(s, E * c), (slot,)),
        "moe.pick fwd+bwd (top_k values as a masked sum)": lambda: (
            grad(lambda v, i: moe.pick(v, i)),
            (logits, jnp.zeros((B * T, P), jnp.int32)),
        ),
        "mod.gather_rows gather fwd+bwd": lambda: (
            grad(lambda v, i: mod.gather_rows(v, i, False)),
            (xb, idx),
        ),
        "grouped combine (vmapped gather_rows) fwd+bwd": lambda: (
            grad(lambda v, f, b: jax.vmap(lambda x, f, b: dispatch.gather_rows(x, f, b, 1))(v, f, b)),
            (jnp.zeros((B, E * c // B, D)), slot.reshape(B, -1), jnp.zeros((B, E * c // B), jnp.int32)),
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topology", default="v5p:2x2x1")
    ap.add_argument("--only", default="", help="comma-separated substrings of probe names to run")
    ap.add_argument("--json", default="", help="append one JSON line per probe to this file")
    args = ap.parse_args()
    device = topology_devices(args.topology)[0]
    probes = {**layers(), **ops()}
    wanted = [w for w in args.only.split(",") if w]
    print(f"| probe ({args.topology}, one device) | optimal_seconds | sentinel? | compile s |")
    print("| --- | --- | --- | --- |")
    for name, build in probes.items():
        if wanted and not any(w in name for w in wanted):
            continue
        t0 = time.time()
        fn, fargs = build()
        try:
            s = compile_seconds(fn, fargs, device)
            flag = "yes" if s < 0 else ""
            cell = f"{s:.6g}"
        except Exception as e:  # one failing probe must not hide the others
            s, flag, cell = None, "", f"error: {str(e).splitlines()[0][:80]}"
        dt = time.time() - t0
        print(f"| {name} | {cell} | {flag} | {dt:.1f} |", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(dict(probe=name, topology=args.topology, optimal_seconds=s)) + "\n")


if __name__ == "__main__":
    main()
