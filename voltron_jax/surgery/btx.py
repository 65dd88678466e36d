"""c-BTX checkpoint surgery: branch, merge N dense branches into one MoE+MoA tree, sparse upcycling.

Papers: Branch-Train-MiX (arXiv 2403.07816), Sparse Upcycling (arXiv 2212.05055), JetMoE MoA
(arXiv 2404.07413). Spec: techniques-b.md sections 4, 5 (c-BTX) and 6.4 (MoA upcycling).

Pure functions on 'params' trees (nested dicts of arrays; numpy or jax), no I/O, no mesh. The target
is described by `target_shapes`, the params of `jax.eval_shape(model.init, ...)` for the MoE/MoA model
(boxed leaves keep their logical axis names, which locate the expert axis). Key mapping of
`btx_merge`, decided per target leaf p (the output has exactly the target's paths, shapes, dtypes):
  - p in the sources with the same shape: the fp32 mean over the experts' source trees (attention
    k/v, norms, embeddings, LM head, latent BitLinear kernels and norm gains, DenseFormer alpha, MoD
    routers, Infini beta, ...). A seed expert is part of the mean: spec 5.1 averages over every
    expert checkpoint, and BTX merges the seed as one more expert model (mean over N + 1 trees).
  - p in the sources, the target has one more axis, 'expert' (MoE ffn/{gate,up,down}/..., MoA
    attn/{q,o}/...): the sources stacked on that axis, branch i -> expert i, the seed last. After the
    layers axis when layers are scanned ([L,E,...]), first otherwise ([E,...]).
  - p in the sources, last axis top_k times longer, under an attention core (Infini beta per query
    head: the MoA core sees top_k * H heads): the mean tiled into the core head order of moa.py.
  - p not in the sources and named 'router' (MoE / MoA routers [..., D, E]): N(0, router_std^2), or
    from per-cluster centroids (`centroid_router_init`; the seed expert's column stays small-random);
    never all-zero (top-k ties pick experts 0..k-1).
  - anything else (a target leaf without source, a source leaf without target) is an error.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Sequence

import jax
import numpy as np

from voltron_jax.errors import VoltronError
from voltron_jax.surgery import tree as T


class SurgeryError(VoltronError, ValueError):
    """Sources and target that cannot be merged; the message names the leaf and the fix."""


def validate(n_sources: int, n_experts: int, seed_expert: bool) -> None:
    """Experts must equal the branches (clusters), plus one with the seed as a generalist expert."""
    want = n_sources + int(seed_expert)
    if n_experts != want:
        seed = " + 1 seed expert" if seed_expert else ""
        raise SurgeryError(
            f"the target has {n_experts} experts but {n_sources} branches{seed} give {want}; set "
            f"model.moe.n_experts / model.moa.n_experts to {want}, or pass {n_experts - int(seed_expert)} "
            f"branches (one per data cluster){'' if seed_expert else ', or add the seed expert'}."
        )


def branch(params, n: int) -> list:
    """n copies of a dense params tree (one per cluster). jax arrays are immutable and shared; numpy
    leaves are copied so that in-place edits of one branch never reach another."""
    if n < 1:
        raise SurgeryError(f"branch: n={n}; make at least one branch.")
    copy = lambda x: np.array(x, copy=True) if isinstance(x, np.ndarray) else x
    return [jax.tree.map(copy, params) for _ in range(n)]


def expert_axes(target_shapes, n_sources_shapes: dict[T.Path, tuple]) -> dict[T.Path, int]:
    """{path: expert axis} for target leaves that stack sources: from the 'expert' logical name when the
    target is boxed, else the unique axis whose removal gives the source shape."""
    out = {}
    names = T.axis_names(target_shapes)
    for path, leaf in T.flatten(target_shapes).items():
        src = n_sources_shapes.get(path)
        shape = T.shape_of(leaf)
        if src is None or len(shape) != len(src) + 1:
            continue
        if names[path] is not None and "expert" in names[path]:
            out[path] = names[path].index("expert")
            continue
        axes = [a for a in range(len(shape)) if shape[:a] + shape[a + 1 :] == tuple(src)]
        if len(axes) != 1:
            raise SurgeryError(
                f"{T.path_str(path)}: cannot tell the expert axis of target shape {shape} "
                f"from source shape {tuple(src)}; pass boxed target shapes "
                "(jax.eval_shape(model.init, ...) keeps the logical axis names)."
            )
        out[path] = axes[0]
    return out


def _fp32_mean(leaves: list) -> np.ndarray:
    return np.mean(np.stack([np.asarray(x, np.float32) for x in leaves]), axis=0)


def _tile_core_heads(mean: np.ndarray, target: tuple, path: T.Path, src: dict) -> np.ndarray:
    """Per-query-head core param [..., H] -> [..., P*H] in moa.py's core order (G, P, H/G)."""
    h, ph = mean.shape[-1], target[-1]
    attn = path[: path.index("core")]
    q, k = src.get(attn + ("q", "kernel")), src.get(attn + ("k", "kernel"))
    if ph % h or q is None or k is None:
        raise SurgeryError(f"{T.path_str(path)}: source shape {mean.shape} does not map to target {target}.")
    p, g = ph // h, k.shape[-1] * h // q.shape[-1]  # k kernel [.., D, G*K], q kernel [.., D, H*K]
    x = mean.reshape(mean.shape[:-1] + (1, g, h // g))
    x = np.broadcast_to(x, mean.shape[:-1] + (p, g, h // g))  # [..., P, G, H/G]
    return np.ascontiguousarray(np.swapaxes(x, -3, -2)).reshape(mean.shape[:-1] + (ph,))


def _router(
    path: T.Path, shape: tuple, dtype, *, key, router_std: float, centroids, n_seed: int, scale: float
) -> np.ndarray:
    """Router [..., D, E]: small random, or scale * (mu_i - mean mu) / |.| from centroids [..., E', D]."""
    k = jax.random.fold_in(key, zlib.crc32(T.path_str(path).encode()))
    w = router_std * np.asarray(jax.random.normal(k, shape, np.float32))
    if centroids is None:
        return w.astype(dtype)
    if path not in centroids:
        raise SurgeryError(
            f"router {T.path_str(path)} has no centroid; centroids cover "
            f"{sorted(T.path_str(p) for p in centroids)}."
        )
    mu = np.asarray(centroids[path], np.float32)  # [..., E', D]
    if mu.shape[:-2] + mu.shape[-1:] != shape[:-2] + shape[-2:-1] or mu.shape[-2] + n_seed != shape[-1]:
        raise SurgeryError(
            f"centroids for {T.path_str(path)} have shape {mu.shape}; the router {shape} "
            f"needs [..., {shape[-1] - n_seed}, {shape[-2]}]."
        )
    d = mu - mu.mean(axis=-2, keepdims=True)
    norm = np.linalg.norm(d, axis=-1, keepdims=True)
    cols = np.where(
        norm > 1e-12, scale * d / np.maximum(norm, 1e-12), np.swapaxes(w[..., : mu.shape[-2]], -1, -2)
    )
    w[..., : mu.shape[-2]] = np.swapaxes(cols, -1, -2)  # seed expert column(s) stay small-random
    return w.astype(dtype)


def btx_merge(
    branch_params: Sequence,
    target_shapes,
    *,
    router_init: str = "random",
    centroids: dict | None = None,
    seed_params=None,
    key=None,
    router_std: float = 0.02,
    router_scale: float = 1.0,
) -> dict:
    """N dense branch params -> one MoE(+MoA) params tree shaped like `target_shapes` (module doc).

    Args:
      branch_params: N params trees of the same dense model (branch i -> expert i).
      target_shapes: params of `jax.eval_shape(target_model.init, ...)` (boxed or plain).
      router_init: 'random' (N(0, router_std^2)) or 'centroid' (needs `centroids`).
      centroids: {router path: [..., N, D] per-cluster mean router inputs} from `centroid_router_init`.
      seed_params: optional dense params appended as the last ("generalist") expert; also averaged.
      key: jax PRNG key for router init (default key 0).
    Returns: nested dicts of numpy arrays with the target's paths, shapes and dtypes.
    """
    if router_init not in ("random", "centroid") or (router_init == "centroid") != (centroids is not None):
        raise SurgeryError(
            f"router_init={router_init!r} with centroids={'given' if centroids else None}: use "
            "'random' without centroids, or 'centroid' with centroid_router_init's output."
        )
    if not branch_params:
        raise SurgeryError("btx_merge needs at least one branch.")
    srcs = [T.flatten(T.unbox(p)) for p in branch_params]
    _check_same_trees(srcs)
    experts = srcs + ([T.flatten(T.unbox(seed_params))] if seed_params is not None else [])
    if seed_params is not None:
        _check_same_trees([srcs[0], experts[-1]])
    key = jax.random.key(0) if key is None else key
    axes = expert_axes(target_shapes, {p: np.shape(x) for p, x in srcs[0].items()})
    router = dict(
        key=key,
        router_std=router_std,
        centroids=centroids,
        scale=router_scale,
        n_seed=int(seed_params is not None),
    )
    out = {}
    for path, leaf in T.flatten(target_shapes).items():
        shape, dtype = T.shape_of(leaf), T.dtype_of(leaf)
        val = _merge_leaf(path, shape, dtype, srcs, experts, axes.get(path), router)
        if val.shape != shape:
            raise SurgeryError(
                f"{T.path_str(path)}: built shape {val.shape} but the target needs {shape}; "
                "the branches and the target config describe different models."
            )
        out[path] = val.astype(dtype)
    unused = sorted(T.path_str(p) for p in srcs[0] if p not in out)
    if unused:
        raise SurgeryError(
            f"source params {unused[:5]}{'...' if len(unused) > 5 else ''} have no place in "
            "the target; the branches and the target config describe different models."
        )
    return T.unflatten(out)


def _merge_leaf(path, shape, dtype, srcs: list, experts: list, axis: int | None, router: dict) -> np.ndarray:
    """One target leaf: stacked experts, fp32 mean (tiled for MoA core heads), or a new router."""
    if axis is not None:
        validate(len(srcs), shape[axis], len(experts) > len(srcs))
        return np.stack([np.asarray(s[path]) for s in experts], axis=axis)
    if path in srcs[0]:
        val = _fp32_mean([s[path] for s in experts])  # branches and the seed expert, if any
        if val.shape != shape and "core" in path:
            val = _tile_core_heads(val, shape, path, srcs[0])
        return val
    if path[-1] == "router":
        return _router(path, shape, dtype, **router)
    raise SurgeryError(
        f"target param {T.path_str(path)} {shape} has no source leaf and is not a "
        "router; the branches and the target config describe different models."
    )


def _check_same_trees(srcs: list[dict]) -> None:
    ref = {p: np.shape(x) for p, x in srcs[0].items()}
    for i, s in enumerate(srcs[1:], 1):
        got = {p: np.shape(x) for p, x in s.items()}
        if got != ref:
            diff = sorted(
                T.path_str(p) for p in set(ref) ^ set(got) | {p for p in ref if got.get(p) != ref[p]}
            )
            raise SurgeryError(
                f"source {i} differs from source 0 at {diff[:5]}; all branches must come from "
                "the same dense model config."
            )


def upcycle(dense_params, target_shapes, *, key=None, router_std: float = 0.02) -> dict:
    """Sparse upcycling: every expert (MoE FFN, MoA q/o) a copy of the dense one, random routers."""
    n = _n_experts(target_shapes, dense_params)
    return btx_merge(branch(dense_params, n), target_shapes, key=key, router_std=router_std)


def _n_experts(target_shapes, dense_params) -> int:
    src = {p: np.shape(x) for p, x in T.flatten(T.unbox(dense_params)).items()}
    sizes = {T.shape_of(T.flatten(target_shapes)[p])[a] for p, a in expert_axes(target_shapes, src).items()}
    if len(sizes) != 1:
        raise SurgeryError(
            f"the target has expert leaves of sizes {sorted(sizes)}; one expert count is needed "
            "(set model.moe.n_experts == model.moa.n_experts)."
        )
    return sizes.pop()


def extract_expert(moe_params, moe_shapes, dense_shapes, j: int) -> dict:
    """Expert j with the shared rest: a params tree of the dense model (routers dropped)."""
    flat = T.flatten(T.unbox(moe_params))
    dense = {p: T.shape_of(x) for p, x in T.flatten(dense_shapes).items()}
    axes = expert_axes(moe_shapes, dense)
    out = {}
    for path, shape in dense.items():
        val = np.asarray(flat[path])
        if path in axes:
            val = np.take(val, j, axis=axes[path])
        elif val.shape != shape:
            raise SurgeryError(f"{T.path_str(path)}: {val.shape} cannot be sliced to the dense {shape}.")
        out[path] = val
    return T.unflatten(out)


def centroid_router_init(model, params, cluster_batches: Sequence[Iterable]) -> dict[T.Path, np.ndarray]:
    """Per-cluster mean router inputs of every MoE/MoA layer: {router path: [..., N, D]} (N clusters;
    [L, N, D] for scanned layers), for `btx_merge(..., router_init='centroid', centroids=...)`.

    `model` is the merged model (flax Module), `params` its params (e.g. btx_merge with random routers),
    `cluster_batches[i]` an iterable of token-id batches [B,T] from cluster i. The router input is the
    block's normalised hidden state, recorded by moe.route as 'intermediates/.../router_input_mean'.
    The train loop runs the same reduction on its own mesh and batches (`router_centroids`)."""
    run = jax.jit(lambda p, ids: model.apply({"params": p}, ids, mutable=["intermediates"])[1])
    return router_centroids(lambda ids: run(params, ids)["intermediates"], cluster_batches)


def router_centroids(forward: Callable[[object], dict], cluster_batches: Sequence[Iterable]) -> dict:
    """{router path: [..., N, D]}: the mean over cluster i's batches of each router's mean input.

    `forward(batch)` returns a model's sown 'intermediates' collection for one batch (any batch format
    the caller's model takes; arrays on the host or fully replicated)."""
    per_cluster = []
    for i, batches in enumerate(cluster_batches):
        sums, n = {}, 0
        for batch in batches:
            for path, val in T.flatten(forward(batch)).items():
                if "router_input_mean" in path:
                    r = path[: path.index("router_input_mean")] + ("router",)
                    sums[r] = sums.get(r, 0.0) + np.asarray(val, np.float32)
            n += 1
        if n == 0 or not sums:
            raise SurgeryError(f"cluster {i}: no batches, or the model has no MoE/MoA router to initialise.")
        per_cluster.append({p: v / n for p, v in sums.items()})
    return {p: np.stack([c[p] for c in per_cluster], axis=-2) for p in per_cluster[0]}
