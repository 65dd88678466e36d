"""The full voltron recipe at tiny scale, every technique on, in one invocation of the single loop.

Run:  python -m voltron_jax.main --config=configs/recipe_tiny.py --workdir=runs/recipe
      (`make demo` runs exactly this.)

Model: BitNet b1.58 linears + Infini-attention + DenseFormer + Mixture-of-Depths, byte-level, d=128.
Recipe (DESIGN.md), all on the embedded standard-library corpus:
  prepare  embed -> c-BTM balanced k-means (8 clusters) -> ICP order (voltron_jax/data/prepare.py)
  stable   WSD warmup + stable lr on the ICP-ordered corpus                      00_stable/
  branch   8 copies of the stable checkpoint, each trained on its cluster       01_branch/cluster_{0..7}/
  mix      btx_merge: FFNs -> 8-expert MoE, attention q/o -> 8 MoA experts,  02_mix/
           everything else averaged in fp32, small random routers (the per-cluster hidden-mean
           init, surgery.btx.centroid_router_init, is not wired into the loop yet)
  moe_ft   MoE+MoA fine-tune = the WSD decay stage on the high-quality mix     03_moe_ft/
Each phase reports overall and per-cluster validation perplexity; the workdir ends with report.md and
losses.png. About 15 minutes on 2 CPU cores.

Variants: `:continue` is the dense baseline for the c-BTX comparison: the seed continued for the same
tokens as the branches plus the fine-tune, with the same decay. `:test` is a seconds-long smoke size.
"""

import ml_collections

from configs import common

MOE_MODEL = "model.ffn=moe,model.attention=moa"


def get_config(arg: str = ""):
    c = common.get_default()
    m = c.model
    m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff = 128, 4, 4, 4, 384
    m.linear, m.memory, m.residual, m.routing = "bitlinear", "infini", "denseformer", "mod"
    m.infini.segment_len = 64
    m.mod.capacity = 0.25
    m.moe.n_experts = m.moa.n_experts = 8
    m.moe.top_k = m.moa.top_k = 2
    c.data.seq_len, c.data.batch_size = 256, 8
    c.data.ordering = "icp"
    c.data.n_clusters = 8
    c.optim.lr = 6e-3  # BitNet tolerates (and wants) a higher peak lr than dense
    c.schedule.warmup = 20
    c.train.log_every, c.train.eval_every, c.train.ckpt_every, c.train.eval_batches = 10, 1000, 50, 2
    c.train.eval_clusters = True
    stable, branch, ft = 150, 15, 40
    if arg == "test":
        stable, branch, ft = 4, 2, 2
        c.schedule.warmup = 2
        c.train.log_every, c.train.ckpt_every = 2, 2
        c.data.embed.fit_sample = 400
    elif arg not in ("", "continue"):
        raise ValueError(f"configs/recipe_tiny.py: unknown variant {arg!r}; use '', 'continue' or 'test'.")
    c.recipe = ml_collections.ConfigDict()
    c.recipe.stable = common.phase(stable, mixture="pretrain")
    if arg == "continue":  # same tokens as 8 branches + fine-tune, same decay, dense all along
        c.recipe.cont = common.phase(branch * c.data.n_clusters, mixture="pretrain", init_from=["stable"])
        c.recipe.decay = common.phase(ft, mixture="decay", stage="decay", init_from=["cont"])
        return c
    c.recipe.branch = common.phase(branch, mixture="cluster", init_from=["stable"], fan_out=c.data.n_clusters)
    c.recipe.mix = common.phase(
        0,
        mixture="decay",
        init_from=["branch"],
        surgery="btx_merge",
        keep_optimizer=False,
        overrides=MOE_MODEL,
    )
    c.recipe.moe_ft = common.phase(ft, mixture="decay", stage="decay", init_from=["mix"], overrides=MOE_MODEL)
    return c
