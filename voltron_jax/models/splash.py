"""Causal attention through the Pallas TPU splash-attention kernel, sharded with shard_map.

Kernel: `jax.experimental.pallas.ops.tpu.splash_attention` (block-sparse flash attention; the causal mask
is static, so fully masked blocks are skipped and no [T,T] score matrix is ever materialised). It is the
TPU path of `attention.causal_attention`, which both the plain core (attention.CausalCore) and the
segment-local attention of Infini-attention call; the XLA path stays for CPU/GPU and for tests.

Selection (`model.attention_impl`): 'auto' takes this kernel when the mesh devices are TPUs (also under
AOT compilation for a TPU topology on a CPU host) and T is a multiple of 128; 'splash' forces it (on CPU
the kernel runs in Pallas interpret mode: slow, for equivalence tests); 'xla' / 'cudnn' never take it.

Sharding: Mosaic kernels cannot be partitioned by GSPMD, so the kernel runs inside `jax.shard_map` over
the mesh of the enclosing `with mesh:` / `jax.set_mesh` context: batch over the batch axes and heads over
'tensor' (the RULES of voltron_jax/sharding.py), sequence whole. Each device vmaps the kernel over its
rows. Outside a mesh context the kernel runs on the one device it has.

Semantics, equal to the XLA path: q is scaled by 1/sqrt(K); grouped KV heads (H % G == 0, query head j
reads KV head j // (H/G)); documents (segment_ids) are folded into the kernel's SegmentIds, and a key
that is not `valid` gets segment id -1, so valid queries never see it (an invalid query's own output is
unspecified on both paths and never used).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax._src import mesh as mesh_lib  # the legacy `with mesh:` context has no public getter
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.sharding import AbstractMesh, Mesh, PartitionSpec

from voltron_jax import sharding

BLOCK = 128  # kernel tile (TPU lane width): T must be a multiple of it


def current_mesh() -> Mesh | AbstractMesh | None:
    """The mesh of the enclosing `jax.set_mesh(...)` (abstract inside jit) or legacy `with mesh:` context."""
    abstract = jax.sharding.get_abstract_mesh()
    if not abstract.empty:
        return abstract

    mesh = mesh_lib.thread_resources.env.physical_mesh
    return None if mesh.empty else mesh


def platform(mesh: Mesh | AbstractMesh | None) -> str:
    """Platform of the devices attention runs on: the mesh's, else JAX's default backend."""
    if isinstance(mesh, AbstractMesh):
        return mesh.abstract_device.platform
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def selected(impl: str, seq_len: int) -> bool:
    """Whether `attention.causal_attention` takes the splash kernel for this impl and sequence length."""
    mesh = current_mesh()
    if impl == "splash":
        if seq_len % BLOCK:
            raise ValueError(
                f"attention_impl='splash' needs a sequence length that is a multiple of {BLOCK} "
                f"(got {seq_len}); use attention_impl='auto' to fall back to XLA."
            )
        if mesh is None and jax.device_count() > 1:
            raise ValueError(
                "attention_impl='splash' on several devices must be traced inside the mesh "
                "context (`with mesh:` or jax.set_mesh) so the kernel can be shard_mapped."
            )
        return True
    # 'auto' without a mesh context on several devices cannot shard the kernel: XLA attention instead.
    sharded_ok = mesh is not None or jax.device_count() == 1
    return impl == "auto" and seq_len % BLOCK == 0 and platform(mesh) == "tpu" and sharded_ok


@functools.lru_cache(maxsize=64)
def _kernel(t: int, heads: int, interpret: bool):

    block = max(b for b in (512, 256, BLOCK) if t % b == 0)
    sizes = sk.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(heads)])
    with jax.ensure_compile_time_eval():  # the cached block tables must be constants, not tracers
        return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _local(q, k, v, seg, interpret: bool):
    """Per-device rows: q [b,T,H,K], k/v [b,T,G,K], seg [b,T] int32 or None -> [b,T,H,K]."""

    t, h, kd = q.shape[1], q.shape[2], q.shape[3]
    kernel = _kernel(t, h, interpret)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [b,T,*,K] -> [b,*,T,K]
    q = heads_first(q * jnp.asarray(kd**-0.5, q.dtype))
    if seg is None:
        out = jax.vmap(kernel)(q, heads_first(k), heads_first(v))
    else:
        out = jax.vmap(lambda a, b, c, s: kernel(a, b, c, segment_ids=sk.SegmentIds(s, s)))(
            q, heads_first(k), heads_first(v), seg
        )
    return heads_first(out)  # [b,T,H,K]


def _spec(mesh, logical: tuple, shape: tuple) -> PartitionSpec:

    return sharding.fit_spec(nn.logical_to_mesh_axes(logical, sharding.rules()), shape, mesh)


def causal_attention(q, k, v, segment_ids=None, valid=None, interpret: bool | None = None) -> jax.Array:
    """Causal softmax attention q [B,T,H,K], k/v [B,T,G,K] -> [B,T,H,K] with the splash kernel.

    segment_ids [B,T] (documents may not see each other) and valid [B,T] (invalid tokens are never
    keys) are optional. `interpret` defaults to True off TPU (Pallas interpret mode)."""
    mesh = current_mesh()
    if interpret is None:
        interpret = platform(mesh) != "tpu"
    seg = None
    if segment_ids is not None or valid is not None:
        seg = jnp.zeros(q.shape[:2], jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
        seg = seg if valid is None else jnp.where(valid, seg, -1)  # [B,T]
    local = functools.partial(_local, interpret=interpret)
    if mesh is None or mesh.size == 1:
        return local(q, k, v, seg)
    qs = _spec(mesh, ("act_batch", None, "act_heads", None), q.shape)
    ks = _spec(mesh, ("act_batch", None, "act_kv_heads", None), k.shape)
    if ks[2] != qs[2]:  # heads and KV heads must be split alike so every group stays on one device
        qs = ks = PartitionSpec(qs[0], None, None, None)
    ss = PartitionSpec(qs[0], None)
    if seg is None:
        fn = jax.shard_map(
            lambda a, b, c: local(a, b, c, None),
            mesh=mesh,
            in_specs=(qs, ks, ks),
            out_specs=qs,
            check_vma=False,
        )
        return fn(q, k, v)
    fn = jax.shard_map(local, mesh=mesh, in_specs=(qs, ks, ks, ss), out_specs=qs, check_vma=False)
    return fn(q, k, v, seg)
