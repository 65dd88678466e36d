"""The ~13B dense voltron seed and the c-BTX 8-expert MoE+MoA model built from it, for TPU pods.

Model (LLaMA-13B shape): 40 layers, d_model 5120, 40 heads of 128 (MHA: the K/V shared by every MoA
expert stay as wide as the dense model's), SwiGLU d_ff 13824, SentencePiece vocabulary 32000, sequence
4096 split into two Infini-attention segments of 2048. Every technique is on: BitLinear (b1.58 ternary)
projections, Infini-attention memory, DenseFormer DWA (dilation 4, period 2), Mixture-of-Depths on
every second layer (capacity 1/8, causal predictor), MiniCPM tensor-program scaling and WSD schedule, In-
Context Pretraining order. bf16 compute, fp32 params, scanned layers with full remat (the v5p preset keeps
the projections' outputs); attention_impl 'auto' takes the Pallas splash kernel on TPU
(voltron_jax/models/splash.py).

Variants (`--config=configs/voltron_13b.py:moe,v4`; comma-separated, any order):
  ''      the seed's full c-BTX recipe: stable (WSD) -> branch x8 (one per c-BTM cluster) -> mix (BTX merge
          into 8-expert MoE + MoA) -> moe_ft (MoE fine-tune = the WSD decay stage, high-quality mix)
  dense   the dense-only two-stage recipe: stable -> decay
  moe     the MoE + MoA model itself (one stable phase): what the moe_ft phase trains, for AOT and sweeps
  plain   the same 13.0B shape with every technique off (dense linears, full causal attention, plain
          residual, no routing; MiniCPM scaling kept, it costs nothing), dense two-stage recipe: the
          baseline of the step-time table (docs/results.md); add one technique back with an override,
          e.g. --config.model.linear=bitlinear | model.memory=infini | model.residual=denseformer |
          model.routing=mod
  v4 | v5p | v5e   sharding preset and global batch for v4-128 (64 megacore chips of 30.75 GiB),
          v5p-128 (64 chips of 95 GiB) or v5e-256 (256 chips of 16 GiB). All presets shard parameters and
          optimizer state fully (fsdp = all devices); the MoE phases add expert parallelism (expert=8 x
          fsdp); on v4 they keep the dense batch 128 as 2 microbatches of 64, with bf16 Adam moments and
          DWA sums; on v5p their remat keeps the dispatch's all-to-all results (PRESETS), and the dense
          phases keep every projection's output (remat 'dots_no_batch_rotated', DENSE_PRESETS).
Parameter counts (launch/aot_compile.py prints them, analytic and from eval_shape): seed 13.0B, MoE 87B
(23.6B active per token: top-2 of 8 experts in FFN and attention).

Runs (pods only; see docs/pods.md). Real data is prepared first (docs/pods.md section 0: raw text ->
JSONL -> Beam prepare -> SentencePiece + ArrayRecord token stores), then:
  python launch/tpu.py run --name=v13 --zone=... -- python -m voltron_jax.main --multihost \\
      --config=configs/voltron_13b.py:v4 --workdir=gs://BUCKET/v13 \\
      --config.data.token_dir=/gcs/BUCKET/v13/data/tokens --compilation_cache=gs://BUCKET/xla_cache
Prove it fits before paying for a pod (docs/results.md, "Pod configs (AOT)"):
  python launch/aot_compile.py --config=configs/voltron_13b.py:moe,v5p --topology=v5p:4x4x4
"""

import ml_collections

from voltron_jax import config

MOE = {"model.ffn": "moe", "model.attention": "moa", "mesh.expert": 8}
# The model variants (tests/test_configs.py builds each); any of them takes a preset too: "moe,v4".
VARIANTS = {
    "": "full c-BTX recipe",
    "dense": "dense two-stage recipe",
    "moe": "the 8-expert MoE + MoA model",
    "plain": "the dense shape with every technique off",
}
PLAIN = {"model.linear": "dense", "model.memory": "none", "model.residual": "plain", "model.routing": "none"}
# preset -> (global batch of the dense seed, of the MoE, mesh, MoE overrides). fsdp=-1 fills the
# devices the run has; data and tensor stay 1: at 13B full FSDP gives the smallest per-device footprint.
# On v5p-128 the MoE trains at the dense batch in one pass. v4-128 (64 megacore chips of 30.75 GiB) holds
# the 87B MoE at one sequence per chip, with Adam moments and the DWA sums in bf16, so it keeps the dense
# batch 128 as 2 accumulated microbatches of 64 (fp32 accumulator): a 27.95 GiB heap per chip
# (docs/results.md, "Expert kernels gathered in bf16").
V4_MOE = {
    "optim.moments_dtype": "bfloat16",
    "model.denseformer.acc_dtype": "bfloat16",
    "train.grad_accum_steps": 2,
}
# v5p-128's 95 GiB chips have room to save the expert-parallel dispatch's all-to-all results for the
# backward ('full_save_dispatch'), so the rematerialised layers do not repeat a third of the all-to-alls:
# the compiler's estimated step 3.99 -> 3.53 s, heap 36.33 -> 59.86 GiB (docs/results.md, "Saving the
# dispatch's all-to-all results"). v4 has no room for it (27.95 of 30.75 GiB).
V5P_MOE = {"model.remat": "full_save_dispatch"}
# preset -> overrides of the dense phases (and of the plain and dense variants). v5p's 95 GiB chips also
# hold every projection's output for the backward, q and k after RoPE ('dots_no_batch_rotated': the
# recomputed forward runs no matmul, only norms, the activation and attention): the compiler's estimated
# plain step 2.13 -> 1.71 s, heap 9.04 -> 37.34 GiB (docs/results.md, "The remat policy on v5p-128").
# Full remat elsewhere: v4's 30.75 GiB.
DENSE_PRESETS = {"v5p": {"model.remat": "dots_no_batch_rotated"}}
PRESETS = {
    "v4": (128, 128, dict(data=1, fsdp=-1, tensor=1, expert=1), V4_MOE),
    "v5p": (128, 128, dict(data=1, fsdp=-1, tensor=1, expert=1), V5P_MOE),
    "v5e": (256, 256, dict(data=1, fsdp=-1, tensor=1, expert=1), {}),
}


def model(c) -> None:
    """The 13.0B dense seed (configs/config.py model fields)."""
    m = c.model
    m.vocab_size, m.d_model, m.n_layers, m.d_ff = 32000, 5120, 40, 13824
    m.n_heads, m.n_kv_heads, m.head_dim = 40, 40, 128
    m.rope_theta = 10000.0
    m.dtype, m.remat, m.scan_layers, m.attention_impl = "bfloat16", "full", True, "auto"
    m.scale_emb, m.scale_depth, m.dim_model_base = 12.0, 1.4, 256  # MiniCPM (arXiv 2404.06395 Table 7)
    m.linear, m.memory, m.residual, m.routing = "bitlinear", "infini", "denseformer", "mod"
    m.infini.segment_len = 2048
    # DWA every 2nd block over outputs 4 apart. The paper's 4x5 makes super-blocks of lcm(5, mod.every=2)
    # = 10 scanned layers: 18.95 GiB of temporaries per v4 core, over its 15.25 (docs/results.md, "Pod
    # configs (AOT)"); 4x2 keeps them at 2 layers (11.56 GiB).
    m.denseformer.dilation, m.denseformer.period = 4, 2
    m.mod.capacity, m.mod.every, m.mod.causal = 0.125, 2, "predictor"
    # per-sequence capacity (stays sharded on pods); 1.25 x the even share of each expert (GShard/Switch)
    m.moe.n_experts, m.moe.top_k, m.moe.impl, m.moe.capacity_factor = 8, 2, "grouped", 1.25
    m.moa.n_experts, m.moa.top_k, m.moa.impl, m.moa.capacity_factor = 8, 2, "grouped", 1.25


def data(c) -> None:
    d = c.data
    d.corpus, d.vocab, d.spm_vocab_size = "tfds:c4/en", "sentencepiece", 32000
    d.seq_len, d.batch_size = 4096, 128
    d.ordering, d.n_clusters = "icp", 8
    d.mixtures.decay = "corpus:1.0"  # point it at the high-quality mix of the run (data.mixtures.decay)


def recipe(c, kind: str) -> None:
    """Phases (steps at 128 x 4096 = 0.52M tokens per step)."""
    c.schedule.warmup = 2000
    c.optim.lr = 1e-2  # MiniCPM's peak; matrices get lr / (d_model / dim_model_base) = 5e-4
    c.recipe = ml_collections.ConfigDict()
    c.recipe.stable = config.phase(200_000, mixture="pretrain", stage="stable")  # ~105B tokens
    if kind == "dense":
        c.recipe.decay = config.phase(20_000, mixture="decay", stage="decay", init_from=["stable"])
    elif kind == "":
        c.recipe.branch = config.phase(
            20_000, mixture="cluster", stage="stable", init_from=["stable"], fan_out=8
        )
        c.recipe.mix = config.phase(
            0, stage="stable", init_from=["branch"], surgery="btx_merge", keep_optimizer=False, overrides=MOE
        )
        c.recipe.moe_ft = config.phase(
            20_000, mixture="decay", stage="decay", init_from=["mix"], overrides=MOE
        )


def get_config(arg: str = ""):
    tokens = [t for t in arg.split(",") if t]
    unknown = [t for t in tokens if t not in ("dense", "moe", "plain", *PRESETS)]
    kinds = [t for t in tokens if t in ("dense", "moe", "plain")]
    presets = [t for t in tokens if t in PRESETS]
    if unknown or len(kinds) > 1 or len(presets) > 1:
        raise ValueError(
            f"configs/voltron_13b.py: bad variant {arg!r}; use comma-separated tokens, at most one "
            f"of dense|moe|plain and one of {'|'.join(PRESETS)} (e.g. 'moe,v4')."
        )
    kind = kinds[0] if kinds else ""
    c = config.get_default()
    model(c)
    data(c)
    recipe(c, {"dense": "dense", "plain": "dense", "": ""}.get(kind, "moe"))
    c.train.log_every, c.train.eval_every, c.train.ckpt_every, c.train.eval_batches = 50, 2000, 1000, 8
    # LM head applied in the loss 4000 vocabulary columns at a time (voltron_jax/losses.py): no fp32 [B,T,V]
    # logits (1000 MiB per chip) and no take_along_axis gather over them (docs/results.md, issue 18).
    c.train.loss_chunk = 4000
    moe = MOE
    if presets:
        dense_batch, moe_batch, mesh, moe_preset = PRESETS[presets[0]]
        c = config.apply_overrides(c, DENSE_PRESETS.get(presets[0], {}))
        c.data.batch_size = dense_batch
        c.mesh.update(mesh)
        moe = {**MOE, "data.batch_size": moe_batch, **moe_preset}
        for name in ("mix", "moe_ft"):  # the MoE phases of the full recipe
            if name in c.recipe:
                c.recipe[name].overrides = config.nest(moe)
    if kind == "moe":
        c = config.apply_overrides(c, moe)
    elif kind == "plain":
        c = config.apply_overrides(c, PLAIN)
    return c
