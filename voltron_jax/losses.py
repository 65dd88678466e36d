"""Token cross-entropy and z-loss: from full logits, or vocab-tiled from the final hidden state.

`cross_entropy(logits, ...)` is the reference: the decoder's fp32 logits [B,T,V], a logsumexp over V and
the target's logit. At 13B on a pod (32000 vocabulary, 4096 tokens, 2 sequences per chip) those logits
are a 1000 MiB fp32 buffer per chip that the backward keeps, plus the copies libtpu makes around the
target gather (docs/results.md, "Chunked cross-entropy").

`head_cross_entropy(hidden, kernel, ...)` computes the same two numbers without ever materialising
[B,T,V]: the LM head is applied here, one vocabulary tile [D,Vt] at a time, under a `jax.custom_vjp`
(the tiling of "Cut Your Losses in Large-Vocabulary Language Models", Wijmans et al., arXiv 2411.09009,
done in plain XLA rather than a fused kernel):
- forward: a scan over the tiles keeps an online logsumexp (running max and sum, [B,T] fp32) and picks
  the target's logit with a compare against the tile's column ids (no gather over V); it saves only
  hidden, the head, the targets and logz;
- backward: a second scan recomputes each tile's logits, forms d logits = g_logz * softmax + g_target *
  onehot in fp32, casts it to the compute dtype as autodiff of the reference does, writes that tile's
  d kernel [D,Vt] (no accumulator over tiles, so no [D,V] carry) and adds d hidden into a [B,T,D] fp32
  carry that stays sharded like hidden.
Peak loss temporaries are a few [B,T,Vt] tiles. A vocabulary that the tile does not divide is padded with
zero columns masked to -inf. Values equal the reference's to fp32 rounding (tests/test_losses.py); the
MiniCPM logit division (d_model / dim_model_base) is already in `hidden` (decoder.Decoder).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

F32 = jnp.float32


def reduce_token_stats(logz, target_logit, weights):
    """(mean NLL, mean logz^2) over weighted tokens: the training loss's ce and z-loss."""
    nll = logz - target_logit
    denom = jnp.maximum(jnp.sum(weights), 1.0)
    return jnp.sum(nll * weights) / denom, jnp.sum(jnp.square(logz) * weights) / denom


def cross_entropy(logits, targets, weights):
    """Mean token NLL and mean squared log-normaliser (z-loss), both over weighted tokens, from [B,T,V]."""
    logz = jax.nn.logsumexp(logits, axis=-1)  # [B,T]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return reduce_token_stats(logz, target_logit, weights)


def _tiles(kernel, tile: int):
    """[D,V] -> ([n,D,Vt] tiles, V): zero columns pad V to a multiple of the tile."""
    d, v = kernel.shape
    n = math.ceil(v / tile)
    if n * tile != v:
        kernel = jnp.pad(kernel, ((0, 0), (0, n * tile - v)))
    return jnp.moveaxis(kernel.reshape(d, n, tile), 1, 0), v


def _tile_logits(hidden, w_tile, i, tile: int, vocab: int):
    """fp32 logits of tile i [B,T,Vt] (padded columns -inf) and the tile's column ids [Vt]."""
    logits = jnp.dot(hidden, w_tile).astype(F32)  # [B,T,Vt]: dot in the compute dtype, as the decoder's head
    cols = i * tile + jnp.arange(tile)
    if vocab % tile:
        logits = jnp.where(cols < vocab, logits, -jnp.inf)
    return logits, cols


def _forward(hidden, kernel, targets, tile: int):
    w_tiles, vocab = _tiles(kernel, tile)
    b, t = targets.shape
    init = (jnp.full((b, t), -jnp.inf, F32), jnp.zeros((b, t), F32), jnp.zeros((b, t), F32))

    def body(carry, xs):
        m, s, tgt = carry
        w_tile, i = xs
        logits, cols = _tile_logits(hidden, w_tile, i, tile, vocab)
        m_new = jnp.maximum(m, jnp.max(logits, axis=-1))  # [B,T]
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[..., None]), axis=-1)
        tgt = tgt + jnp.sum(jnp.where(cols == targets[..., None], logits, 0.0), axis=-1)
        return (m_new, s, tgt), None

    (m, s, tgt), _ = jax.lax.scan(body, init, (w_tiles, jnp.arange(w_tiles.shape[0])))
    return m + jnp.log(s), tgt


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _token_stats(hidden, kernel, targets, tile):
    return _forward(hidden, kernel, targets, tile)


def _token_stats_fwd(hidden, kernel, targets, tile):
    logz, tgt = _forward(hidden, kernel, targets, tile)
    return (logz, tgt), (hidden, kernel, targets, logz)


def _token_stats_bwd(tile, res, g):
    hidden, kernel, targets, logz = res
    g_logz, g_tgt = g
    w_tiles, vocab = _tiles(kernel, tile)

    def body(dh, xs):
        w_tile, i = xs
        logits, cols = _tile_logits(hidden, w_tile, i, tile, vocab)
        p = jnp.exp(logits - logz[..., None])  # softmax of the tile [B,T,Vt]
        dlogits = g_logz[..., None] * p + jnp.where(cols == targets[..., None], g_tgt[..., None], 0.0)
        dlogits = dlogits.astype(hidden.dtype)  # the reference's logits.astype(f32) transposes to this
        dh = dh + jnp.einsum("btv,dv->btd", dlogits, w_tile, preferred_element_type=F32)
        dw_tile = jnp.einsum("btd,btv->dv", hidden, dlogits)  # [D,Vt], complete: no carry over tiles
        return dh, dw_tile

    dh, dw = jax.lax.scan(body, jnp.zeros(hidden.shape, F32), (w_tiles, jnp.arange(w_tiles.shape[0])))
    d = kernel.shape[0]
    dw = jnp.moveaxis(dw, 0, 1).reshape(d, -1)[:, :vocab]  # [n,D,Vt] -> [D,V]
    return dh.astype(hidden.dtype), dw.astype(kernel.dtype), None


_token_stats.defvjp(_token_stats_fwd, _token_stats_bwd)


def head_token_stats(hidden, kernel, targets, tile: int):
    """(logz, target logit) [B,T] fp32 of logits = hidden @ kernel, vocabulary-tiled (module docstring).
    hidden [B,T,D] in the compute dtype; kernel [D,V] (any dtype; cast to hidden's, as the LM head does)."""
    if tile <= 0:
        raise ValueError(f"tile={tile}: the vocabulary tile must be > 0 (0 means the full-logits loss).")
    return _token_stats(hidden, kernel.astype(hidden.dtype), targets, int(tile))


def head_cross_entropy(hidden, kernel, targets, weights, tile: int):
    """`cross_entropy(hidden @ kernel, targets, weights)` without the [B,T,V] logits."""
    logz, target_logit = head_token_stats(hidden, kernel, targets, tile)
    return reduce_token_stats(logz, target_logit, weights)
