"""Sampling and scoring with a trained Decoder: KV-cache decoding, full-recompute fallback, per-token NLL.

Token ids only (voltron_jax/inference/api.py adds the vocabulary). Every prompt starts with EOS, the document
boundary the model saw before each document in training (packing.py), so the first real token is
conditioned exactly as in training; `score` does the same.

Cached decoding: `decoder.build_model(m, decode=True)` keeps each layer's decode state in the 'cache'
collection (CausalCore's KV cache, InfiniCore's open segment and compressive memory, whatever a slot
declares). One `apply(..., mutable=['cache'])` at the full length shapes it; then the right-padded prompts
are prefilled in one call (`valid` marks real tokens, so each row's cache advances by its own length) and
each step feeds one token per row. Nothing here knows which techniques are on: MoD routing, MoE/MoA
routing and Infini memory all live behind the same call and collection.

Fallback: a model whose decode build raises NotImplementedError (a slot that cannot stream, e.g. MoD
routing over Infini segments) is sampled by recomputing the training forward over the whole prefix at
every step (rows padded to a multiple of `pad_multiple`, the config's data.seq_len, with valid=False).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

EOS_ID = 1


def sample_logits(
    logits: jax.Array, key: jax.Array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> jax.Array:
    """Next ids [B] from logits [B,V]: greedy at temperature 0, else softmax(logits / T) restricted to the
    top_k most likely ids (0: all) and to the smallest set whose probability reaches top_p (1: all)."""
    logits = logits.astype(jnp.float32)
    if temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]  # [B,1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)  # [B,V]
        probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely ids
        drop = (
            jnp.zeros_like(logits, bool).at[jnp.arange(logits.shape[0])[:, None], order].set(before >= top_p)
        )
        logits = jnp.where(drop, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


_sample = jax.jit(sample_logits, static_argnums=(2, 3, 4))


def pad_rows(rows: Sequence[Sequence[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids [B,length] int32 and valid [B,length] bool."""
    ids = np.zeros((len(rows), length), np.int32)
    valid = np.zeros((len(rows), length), bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        valid[i, : len(r)] = True
    return ids, valid


def _positions(b: int, t: int) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


@functools.partial(jax.jit, static_argnums=(0, 2))
def empty_cache(model, params, shape: tuple[int, int]):
    """The decode model's initial 'cache' collection for `shape` = (rows, maximum length)."""
    ids = jnp.zeros(shape, jnp.int32)
    _, cols = model.apply({"params": params}, ids, _positions(*shape), mutable=["cache"])
    return cols["cache"]


@functools.partial(jax.jit, static_argnums=(0,))
def _prefill(model, params, cache, ids, valid):
    logits, cols = model.apply(
        {"params": params, "cache": cache}, ids, _positions(*ids.shape), None, valid, mutable=["cache"]
    )
    last = jnp.sum(valid, axis=1) - 1  # [B] each row's last prompt token
    return cols["cache"], jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]  # [B,V]


@functools.partial(jax.jit, static_argnums=(0,))
def _step(model, params, cache, tok, pos):
    logits, cols = model.apply(
        {"params": params, "cache": cache}, tok[:, None], pos[:, None], mutable=["cache"]
    )
    return cols["cache"], logits[:, 0]  # [B,V]


@functools.partial(jax.jit, static_argnums=(0,))
def _full_last(model, params, ids, valid):
    logits = model.apply({"params": params}, ids, _positions(*ids.shape), None, valid)
    last = jnp.sum(valid, axis=1) - 1
    return jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]  # [B,V]


def _finish(out: np.ndarray, stops: Sequence[int]) -> list[list[int]]:
    """Generated ids per row, cut before the first of `stops` (empty: uncut)."""
    res = []
    for r in out:
        r = list(map(int, r))
        cut = next((k for k, t in enumerate(r) if t in stops), len(r))
        res.append(r[:cut])
    return res


def generate_ids(
    decode_model,
    train_model,
    params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int = EOS_ID,
    pad_multiple: int = 1,
    stop_at_eos: bool = True,
    stop_ids: Sequence[int] = (),
) -> list[list[int]]:
    """Continue each prompt (ids, EOS prepended here) by up to max_new_tokens ids; rows end at their
    first generated EOS or `stop_ids` id (with stop_at_eos; the loop ends when every row has one); stop_ids:
    e.g. an imported tokenizer's own EOS, when the boundary id `eos_id` is its BOS (data/vocab.py).

    `decode_model` is build_model(m, decode=True), or None to recompute `train_model` over the prefix."""
    rows = [[eos_id, *map(int, p)] for p in prompts]
    stops = sorted({eos_id, *map(int, stop_ids)}) if stop_at_eos else []
    if max_new_tokens <= 0:
        return [[] for _ in rows]
    b, lens = len(rows), np.array([len(r) for r in rows])
    key = jax.random.key(seed)
    pick = lambda logits, i: _sample(logits, jax.random.fold_in(key, i), temperature, top_k, top_p)
    out = np.zeros((b, max_new_tokens), np.int32)
    done = np.zeros(b, bool)
    if decode_model is not None:
        ids, valid = pad_rows(rows, int(lens.max()))
        cache = empty_cache(decode_model, params, (b, int(lens.max()) + max_new_tokens))
        cache, logits = _prefill(decode_model, params, cache, ids, valid)
    else:
        total = int(lens.max()) + max_new_tokens
        width = -(-total // pad_multiple) * pad_multiple
        logits = _full_last(train_model, params, *pad_rows(rows, width))
    for i in range(max_new_tokens):
        tok = np.asarray(pick(logits, i))
        out[:, i] = tok
        done |= np.isin(tok, stops)
        if done.all() or i == max_new_tokens - 1:
            break
        if decode_model is not None:
            cache, logits = _step(
                decode_model, params, cache, jnp.asarray(tok), jnp.asarray(lens + i, jnp.int32)
            )
        else:
            rows = [r + [int(t)] for r, t in zip(rows, tok)]
            logits = _full_last(train_model, params, *pad_rows(rows, width))
    return _finish(out[:, : i + 1], stops)


@functools.partial(jax.jit, static_argnums=(0,))
def _nll(model, params, ids, valid):
    logits = model.apply({"params": params}, ids, _positions(*ids.shape), None, valid)  # [B,T,V]
    logz = jax.nn.logsumexp(logits[:, :-1], axis=-1)
    return logz - jnp.take_along_axis(logits[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]  # [B,T-1]


def score_ids(
    train_model, params, texts: Sequence[Sequence[int]], *, eos_id: int = EOS_ID, pad_multiple: int = 1
) -> list[np.ndarray]:
    """Per-token negative log-likelihood (nats) of each id sequence, every token conditioned on EOS and
    the tokens before it (the training objective); returns one float32 array per text."""
    rows = [[eos_id, *map(int, t)] for t in texts]
    width = -(-max(len(r) for r in rows) // pad_multiple) * pad_multiple
    nll = np.asarray(_nll(train_model, params, *pad_rows(rows, width)))
    return [nll[i, : len(r) - 1].astype(np.float32) for i, r in enumerate(rows)]
