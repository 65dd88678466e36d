"""Gradient accumulation: one optimizer step over N microbatches, scanned inside the jitted train step.

    value, grads = accumulate(fn, params, batch, n, acc_dtype, shardings)

`fn(params, microbatch) -> ((loss, metrics), grads)` must return each microbatch's SHARE of the step's
values (train.py scales token-mean terms by the microbatch's share of the step's weighted tokens and
per-batch terms by 1/N), so the plain sum over microbatches is the step's value and its gradient: for
token-mean losses N microbatches of B/N give the update one batch of B gives (tests/test_grad_accum.py).
Statistics of the whole batch that are not token means (the MoE load-balancing loss) become the mean of
the microbatches' values, as in MaxText and Megatron-LM gradient accumulation.

Microbatch k holds rows k, k+N, k+2N, ... of the global batch: under the batch-sharded layout every
device's rows are split evenly between the microbatches, so the split moves no data (config.validate
requires data.batch_size / N to divide by the batch shards). Gradients are summed into an accumulator
of `acc_dtype` (float32, or bfloat16 to save one parameter-sized buffer on big models) kept on the
parameters' shardings; values (loss, metrics) are summed in float32. MaxText's `gradient_accumulation`
and t5x's `num_microbatches` are the same technique.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ACC_DTYPES = ("float32", "bfloat16", "moments")  # moments: the dtype of optim.moments_dtype


def accumulator_dtype(config) -> jnp.dtype:
    """Dtype of the gradient accumulator from `train.grad_accum_dtype`."""
    name = config.train.grad_accum_dtype
    return jnp.dtype(config.optim.moments_dtype if name == "moments" else name)


def split(x: jax.Array, n: int) -> jax.Array:
    """[B, ...] -> [N, B/N, ...]; microbatch k holds rows k, k+N, ... (strided: no data movement)."""
    b = x.shape[0]
    x = x.reshape(b // n, n, *x.shape[1:]).swapaxes(0, 1)  # [N, B/N, ...]
    return nn.with_logical_constraint(x, (None, "act_batch") + (None,) * (x.ndim - 2))


def accumulate(
    fn: Callable[[Any, dict], tuple[Any, Any]],
    params,
    batch: dict,
    n: int,
    acc_dtype=jnp.float32,
    shardings=None,
):
    """Sum of `fn(params, microbatch)` = ((loss, metrics), grads) over the N microbatches of `batch`.

    n == 1 calls fn once on the whole batch. `shardings` (the parameters' shardings, optional) pins the
    accumulator to them. Returns (value, grads) with grads in the parameters' dtypes."""
    if n == 1:
        return fn(params, batch)
    micro = jax.tree.map(lambda x: split(x, n), batch)

    def pin(tree):
        return tree if shardings is None else jax.lax.with_sharding_constraint(tree, shardings)

    value_shape, _ = jax.eval_shape(fn, params, jax.tree.map(lambda x: x[0], micro))
    value0 = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), value_shape)
    grads0 = pin(jax.tree.map(lambda p: jnp.zeros(p.shape, acc_dtype), params))

    def body(carry, mb):
        value, acc = carry
        v, g = fn(params, mb)
        value = jax.tree.map(lambda a, x: a + x.astype(jnp.float32), value, v)
        acc = jax.tree.map(lambda a, x: (a.astype(jnp.float32) + x).astype(a.dtype), acc, g)  # one rounding
        return (value, pin(acc)), None

    (value, acc), _ = jax.lax.scan(body, (value0, grads0), micro)
    return value, jax.tree.map(lambda a, p: a.astype(p.dtype), acc, params)
