"""The decoder backbone: embed -> L blocks -> final norm -> LM head, composed from the slots.

`build_model(model_cfg)` is the only place that reads the model config: it looks the slot choices up in
voltron_jax/registry.py and hands each module just the hyperparameters it uses.

MiniCPM parameterisation (arXiv 2404.06395, techniques-b.md 2.3): h0 = scale_emb * embed(ids); every
residual branch scaled by scale_depth / sqrt(L); logits = head(h / (d_model / dim_model_base)); 2-D
hidden and output matrices initialised with std init_std / sqrt(d_model / dim_model_base). Deviation: the
input embedding keeps std init_std (not width-scaled), as in muP's input layer, so the residual stream's
scale at init is independent of width (tests/models/test_decoder.py coordinate check). Neutral values
(scale_emb=1, scale_depth=0, dim_model_base=0) give a plain pre-norm transformer.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from voltron_jax import registry
from voltron_jax.models import moe_groups
from voltron_jax.models.attention import ROTATED, head_dim
from voltron_jax.models.layers import Embed, RMSNorm, param_with_axes

REMAT_POLICIES = {
    "full": None,
    # full remat, but the expert-parallel dispatch's all-to-all results are saved: the recomputed forward
    # repeats none of its all-to-alls (a third of them), for [E,B*C,D] buffers per MoE/MoA projection
    # (grouped impl only; other models save nothing more than 'full')
    "full_save_dispatch": jax.checkpoint_policies.save_only_these_names(
        moe_groups.DISPATCHED, moe_groups.COMBINED
    ),
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    # the same, with CausalCore's q and k kept after RoPE instead of before it (the tensors of MaxText's
    # 'minimal'): the backward recomputes no rotation
    "dots_no_batch_rotated": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
        jax.checkpoint_policies.save_only_these_names(ROTATED),
    ),
}
# Collections that a scanned layer stacks along its leading 'layers' axis. 'state' holds per-module
# copies of the global step that the train loop fills (BitLinear warm-in reads it).
SCANNED_COLLECTIONS = ("params", "aux_loss", "intermediates", "stats", "cache", "state")


class Block(nn.Module):
    """Pre-norm block: x + rs * attn(norm(x)); x + rs * ffn(norm(x))."""

    attention: Any  # callable(name=...) -> attention module
    ffn: Any  # callable(name=...) -> ffn module
    residual_scale: float = 1.0
    norm_eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, segment_ids=None, valid=None):
        h = RMSNorm(self.norm_eps, self.dtype, name="attn_norm")(x)
        x = x + self.residual_scale * self.attention(name="attn")(h, positions, segment_ids, valid)
        h = RMSNorm(self.norm_eps, self.dtype, name="ffn_norm")(x)
        x = x + self.residual_scale * self.ffn(name="ffn")(h)
        return nn.with_logical_constraint(x, ("act_batch", "act_seq", "act_embed"))


class NoRouting:
    """Routing slot 'none' (registry.RoutingSlot): every layer is the plain block."""

    @staticmethod
    def wrap(make_block, index: int, m, decode: bool = False):
        del index, m, decode
        return make_block()

    @staticmethod
    def period_of(m) -> int:
        return 1

    @staticmethod
    def layer_fraction(m, index: int) -> float:
        """Fraction of tokens layer `index` computes (for FLOPs)."""
        return 1.0

    @staticmethod
    def from_config(m) -> dict:
        return {}

    @staticmethod
    def flops_per_token(m, seq_len: int) -> float:
        """No router."""
        return 0.0

    @staticmethod
    def validate(config) -> None:
        del config


class SuperBlock(nn.Module):
    """`len(layers)` consecutive layers; the unit that is scanned and rematerialised."""

    layers: tuple  # callables(name=...) -> layer modules

    @nn.compact
    def __call__(self, x, positions, segment_ids=None, valid=None):
        for j, make in enumerate(self.layers):
            x = make(name=f"layer_{j}")(x, positions, segment_ids, valid)
        return x


class ScannedSuperBlock(SuperBlock):
    """SuperBlock with the (carry, output) signature nn.scan expects."""

    def __call__(self, x, positions, segment_ids=None, valid=None):
        return super().__call__(x, positions, segment_ids, valid), None


def run_stack(layers: list, x, positions, segment_ids, valid, *, period: int, scan: bool, remat: str):
    """Run `layers` over x as super-blocks of `period` layers: scanned (params stacked on a leading
    'layers' axis, one compile of the body) or unrolled, each optionally rematerialised. Call it from
    inside a residual slot's compact `__call__` so the super-blocks become its children."""
    cls = ScannedSuperBlock if scan else SuperBlock
    if remat != "none":
        cls = nn.remat(cls, policy=REMAT_POLICIES[remat], prevent_cse=not scan)
    n_super = len(layers) // period
    if not scan:  # a last, shorter super-block takes any remainder
        for s in range(math.ceil(len(layers) / period)):
            x = cls(tuple(layers[s * period : (s + 1) * period]), name=f"block_{s}")(
                x, positions, segment_ids, valid
            )
        return x
    if len(layers) % period:
        raise ValueError(
            f"scan_layers=True needs n_layers={len(layers)} to be a multiple of the super-block size "
            f"{period} (lcm of the routing and residual periods); set scan_layers=False."
        )
    scanned = nn.scan(
        cls,
        variable_axes={c: 0 for c in SCANNED_COLLECTIONS},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
        length=n_super,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    x, _ = scanned(tuple(layers[:period]), name="blocks")(x, positions, segment_ids, valid)
    return x


class PlainResidual(nn.Module):
    """Residual slot 'plain': block i+1 reads block i's output."""

    layers: tuple
    period: int = 1
    scan: bool = False
    remat: str = "none"

    @nn.compact
    def __call__(self, x, positions, segment_ids=None, valid=None):
        return run_stack(
            list(self.layers),
            x,
            positions,
            segment_ids,
            valid,
            period=self.period,
            scan=self.scan,
            remat=self.remat,
        )

    # ------------------------------------------------------------- residual slot (registry.ResidualSlot)

    @staticmethod
    def period_of(m) -> int:
        return 1

    @staticmethod
    def from_config(m) -> dict:
        return {}

    @staticmethod
    def flops_per_token(m, seq_len: int) -> float:
        return 0.0

    @staticmethod
    def validate(config) -> None:
        del config


class LMHead(nn.Module):
    """The untied LM head [D,V] (param 'kernel', axes embed x vocab): logits in `dtype`, or the kernel
    itself for a loss that applies it one vocabulary tile at a time (voltron_jax/losses.py)."""

    vocab_size: int
    init_std: float = 0.02
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, return_kernel: bool = False):
        init = nn.initializers.normal(self.init_std)
        w = param_with_axes(self, "kernel", init, (x.shape[-1], self.vocab_size), ("embed", "vocab"))
        return w if return_kernel else jnp.dot(x.astype(self.dtype), w.astype(self.dtype))  # [B,T,V]


class Decoder(nn.Module):
    """Token ids [B,T] -> logits [B,T,V] (fp32). With return_hidden=True -> (hidden [B,T,D] in the compute
    dtype, the LM head's kernel [D,V]), logits = hidden @ kernel left to the vocabulary-tiled loss
    (voltron_jax/losses.py) so that the full [B,T,V] logits never exist; hidden already carries the
    MiniCPM division by d_model / dim_model_base."""

    vocab_size: int
    d_model: int
    stack: Any  # callable(name=...) -> residual-slot module running all layers
    scale_emb: float = 1.0
    logit_div: float = 1.0
    tie_embeddings: bool = False
    init_std: float = 0.02  # embedding
    head_init_std: float = 0.02  # untied LM head
    norm_eps: float = 1e-6  # the final RMSNorm's, = the blocks' (model.norm_eps)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids, positions=None, segment_ids=None, valid=None, return_hidden: bool = False):
        b, t = ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        embed = Embed(self.vocab_size, self.d_model, self.init_std, self.dtype, name="embed")
        x = embed(ids) * self.scale_emb  # [B,T,D]
        x = nn.with_logical_constraint(x, ("act_batch", "act_seq", "act_embed"))
        x = self.stack(name="stack")(x, positions, segment_ids, valid)
        x = RMSNorm(self.norm_eps, self.dtype, name="final_norm")(x) / self.logit_div
        head = None
        if not self.tie_embeddings:
            head = LMHead(self.vocab_size, self.head_init_std, self.dtype, name="lm_head")
        if return_hidden:
            x = nn.with_logical_constraint(x.astype(self.dtype), ("act_batch", "act_seq", "act_embed"))
            kernel = embed.embedding.T if head is None else head(x, return_kernel=True)  # [D,V]
            return x, kernel
        logits = embed.attend(x) if head is None else head(x)  # [B,T,V]
        return nn.with_logical_constraint(logits.astype(jnp.float32), ("act_batch", "act_seq", "act_vocab"))


# --------------------------------------------------------------------------------------------- build


def width_factor(m) -> float:
    return m.d_model / m.dim_model_base if m.dim_model_base > 0 else 1.0


def slot_kwargs(cls, m) -> dict:
    """Hyperparameters a slot class takes from the config (its `from_config`)."""
    return cls.from_config(m)


def make_block(*, attention, core, ffn, block_fields: dict, **core_overrides):
    """The Block constructor (callable(name=...) -> Block) with the memory core's fields overridden by
    `core_overrides` (e.g. segment_len=k). build_model hands routing this as a factory with everything
    but the overrides bound (registry.BlockFactory), so routing never looks inside the partials."""
    c = functools.partial(core, **core_overrides) if core_overrides else core
    return functools.partial(Block, attention=functools.partial(attention, core=c), ffn=ffn, **block_fields)


def build_parts(m, decode: bool = False) -> dict[str, Any]:
    """The slot constructors for model config `m`, each with its fields bound: 'linear' (features,
    kernel_axes -> module), 'memory', 'attention', 'ffn' (callable(name=...) -> module), 'make_block'
    (the block factory routing gets), 'layers' (one callable per layer, routing applied) and 'stack' (the
    residual slot over all layers)."""
    slots = registry.selected(m)
    dtype = jnp.dtype(m.dtype)
    std = m.init_std / math.sqrt(width_factor(m))
    linear = functools.partial(slots["linear"], init_std=std, dtype=dtype, **slot_kwargs(slots["linear"], m))
    core = functools.partial(
        slots["memory"],
        rope_theta=m.rope_theta,
        impl=m.attention_impl,
        decode=decode,
        dtype=dtype,
        **slot_kwargs(slots["memory"], m),
    )
    attention = functools.partial(
        slots["attention"],
        n_heads=m.n_heads,
        n_kv_heads=m.n_kv_heads,
        head_dim=head_dim(m),
        linear=linear,
        **slot_kwargs(slots["attention"], m),
    )
    ffn = functools.partial(slots["ffn"], d_ff=m.d_ff, linear=linear, **slot_kwargs(slots["ffn"], m))
    rs = m.scale_depth / math.sqrt(m.n_layers) if m.scale_depth > 0 else 1.0
    blocks = functools.partial(
        make_block,
        attention=attention,
        core=core,
        ffn=ffn,
        block_fields=dict(residual_scale=rs, norm_eps=m.norm_eps, dtype=dtype),
    )
    routing = slots["routing"]
    layers = tuple(routing.wrap(blocks, i, m, decode=decode) for i in range(m.n_layers))
    residual = slots["residual"]
    period = super_block_size(m)
    stack = functools.partial(
        residual, layers=layers, period=period, scan=m.scan_layers, remat=m.remat, **slot_kwargs(residual, m)
    )
    return dict(
        linear=linear,
        memory=core,
        attention=functools.partial(attention, core=core),
        ffn=ffn,
        make_block=blocks,
        layers=layers,
        stack=stack,
    )


def build_model(m, decode: bool = False) -> Decoder:
    """The Decoder for model config `m` (voltron_jax/config.py), slots resolved through the registry."""
    std = m.init_std / math.sqrt(width_factor(m))
    return Decoder(
        vocab_size=m.vocab_size,
        d_model=m.d_model,
        stack=build_parts(m, decode)["stack"],
        scale_emb=m.scale_emb,
        logit_div=width_factor(m),
        tie_embeddings=m.tie_embeddings,
        init_std=m.init_std,
        head_init_std=std,
        norm_eps=m.norm_eps,
        dtype=jnp.dtype(m.dtype),
    )


def super_block_size(m) -> int:
    """Layers per super-block (the scanned, rematerialised unit): lcm of the routing and residual periods."""
    slots = registry.selected(m)
    return math.lcm(slots["routing"].period_of(m), slots["residual"].period_of(m))


def flops_per_token(m, seq_len: int) -> float:
    """Analytic forward FLOPs per token (matmuls + attention; causal attention counted at half).

    Each slot contributes its own count (registry.py says what each slot's `flops_per_token(m, seq_len)`
    covers), so MFU and equal-FLOPs comparisons follow the techniques. Training FLOPs are 3x this
    (forward + backward)."""
    s = registry.selected(m)
    per_layer = []
    heads = s["attention"].core_head_factor(m)
    linear = s["linear"].flops_per_token(m, seq_len)  # beyond the matmuls; 0 for dense and bitlinear
    for i in range(m.n_layers):
        frac = s["routing"].layer_fraction(m, i)
        core = s["memory"].flops_per_token(m, seq_len) * heads  # MoA: top_k * n_heads query heads
        attn = s["attention"].flops_per_token(m, seq_len) + core * frac
        per_layer.append(frac * (attn + s["ffn"].flops_per_token(m, seq_len) + linear))
    head = 2.0 * m.d_model * m.vocab_size
    residual, routing = s["residual"].flops_per_token(m, seq_len), s["routing"].flops_per_token(m, seq_len)
    return sum(per_layer) + head + residual + routing
