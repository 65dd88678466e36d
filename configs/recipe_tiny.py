"""The full voltron recipe at tiny scale, every technique on, in one invocation of the single loop.

Run:  python -m voltron_jax.main --config=configs/recipe_tiny.py --workdir=runs/recipe
      (`make demo` runs exactly this.)

Model: BitNet b1.58 linears + Infini-attention + DenseFormer + Mixture-of-Depths, byte-level, d=128.
Recipe (docs/design.md), all on the embedded standard-library corpus:
  prepare  embed -> c-BTM balanced k-means (8 clusters) -> ICP order (voltron_jax/data/prepare.py)
  stable   WSD warmup + stable lr on the ICP-ordered corpus                      00_stable/
  branch   8 copies of the stable checkpoint, each trained on its cluster       01_branch/cluster_{0..7}/
  mix      btx_merge: FFNs -> 8-expert MoE, attention q/o -> 8 MoA experts,  02_mix/
           everything else averaged in fp32; small random routers N(0, 0.02^2). Centroid routers
           (`--config.surgery.router_init=centroid`: column i = the centred, normalised mean router
           input of 4 training batches of cluster i) merged worse here (docs/results.md, c-BTX).
  moe_ft   MoE+MoA fine-tune = the WSD decay stage on the high-quality mix     03_moe_ft/
Each phase reports overall and per-cluster validation perplexity; the workdir ends with report.md and
losses.png. About 2-5 minutes on 2 CPU cores (docs/results.md).

Variants (comma-separated, e.g. `:test,seed_expert`): `:continue` is the dense baseline for the c-BTX
comparison: the seed continued for the same tokens as the branches plus the fine-tune, with the same
decay; `:continue,flops_matched` continues it longer, so that its training FLOPs equal c-BTX's (the
top-2 MoE fine-tune costs more per token than the dense model). `:cbtm` is the c-BTM control: the same
stable seed and branches, then each branch decayed (WSD decay stage, a fan-out phase continuing member i
from branch i, on its own cluster) for as many steps as make the eight decays' FLOPs equal the MoE
fine-tune's; no merge (experiments/ensemble.py mixes the decayed branches). `:seed_expert` merges the
stable checkpoint as a 9th, generalist expert (BTX; 9 MoE and 9 MoA experts, the seed also averaged into
the shared params). `:test` is a seconds-long smoke size.
"""

import ml_collections

from voltron_jax import config
from voltron_jax.models import decoder

MOE_MODEL = {"model.ffn": "moe", "model.attention": "moa"}
VARIANTS = (
    "", "continue", "test", "seed_expert", "test,seed_expert", "continue,flops_matched", "cbtm", "test,cbtm",
    "test,continue,flops_matched",
)  # fmt: skip
OPTIONS = {"continue", "test", "seed_expert", "flops_matched", "cbtm"}


def get_config(arg: str = ""):
    opts = set(filter(None, arg.split(",")))
    exclusive = len(opts & {"continue", "seed_expert", "cbtm"}) > 1
    if not opts <= OPTIONS or exclusive or ("flops_matched" in opts and "continue" not in opts):
        raise ValueError(
            f"configs/recipe_tiny.py: unknown variant {arg!r}; use '', 'continue', 'continue,flops_matched', "
            "'cbtm', 'seed_expert', or 'test' with one of them (e.g. 'test,seed_expert')."
        )
    c = config.get_default()
    m = c.model
    m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff = 128, 4, 4, 4, 384
    m.linear, m.memory, m.residual, m.routing = "bitlinear", "infini", "denseformer", "mod"
    m.infini.segment_len = 64
    m.mod.capacity = 0.25
    m.moe.n_experts = m.moa.n_experts = 8 + ("seed_expert" in opts)
    m.moe.top_k = m.moa.top_k = 2
    c.data.seq_len, c.data.batch_size = 256, 8
    c.data.ordering = "icp"
    c.data.n_clusters = 8
    c.data.val_fraction = 0.05  # 42 validation docs, 3-8 per cluster (0.02: 17, none for one cluster)
    c.optim.lr = 6e-3  # not tuned for this shape (tiny_bitnet's sweep at d=256 preferred 1.5e-3)
    c.schedule.warmup = 20
    c.train.log_every, c.train.eval_every, c.train.ckpt_every, c.train.eval_batches = 10, 1000, 50, 2
    c.train.eval_clusters = True
    c.surgery.router_init, c.surgery.centroid_batches = "random", 4
    c.surgery.seed_expert = "seed_expert" in opts
    stable, branch, ft = 150, 15, 40
    if "test" in opts:
        stable, branch, ft = 4, 2, 2
        c.schedule.warmup = 2
        c.train.log_every, c.train.ckpt_every = 2, 2
        c.data.embed.fit_sample = 400
        c.surgery.centroid_batches = 1
    c.recipe = ml_collections.ConfigDict()
    c.recipe.stable = config.phase(stable, mixture="pretrain")
    # the MoE fine-tune's FLOPs per token over the dense model's (top-2 of 8 FFN and attention experts)
    moe_cost = _flops(config.apply_overrides(c, MOE_MODEL)) / _flops(c)
    if "continue" in opts:  # same tokens as 8 branches + fine-tune, same decay, dense all along
        cont = branch * c.data.n_clusters
        if "flops_matched" in opts:  # + the fine-tune's extra FLOPs, as dense steps
            cont += round(ft * (moe_cost - 1))
        c.recipe.cont = config.phase(cont, mixture="pretrain", init_from=["stable"])
        c.recipe.decay = config.phase(ft, mixture="decay", stage="decay", init_from=["cont"])
        return c
    c.recipe.branch = config.phase(branch, mixture="cluster", init_from=["stable"], fan_out=c.data.n_clusters)
    if "cbtm" in opts:  # each branch decayed; the eight decays together cost the MoE fine-tune's FLOPs
        decay = max(1, round(ft * moe_cost / c.data.n_clusters))
        c.recipe.branch_decay = config.phase(
            decay, mixture="cluster", stage="decay", init_from=["branch"], fan_out=c.data.n_clusters
        )
        return c
    c.recipe.mix = config.phase(
        0,
        mixture="decay",
        init_from=["branch"],
        surgery="btx_merge",
        keep_optimizer=False,
        overrides=MOE_MODEL,
    )
    c.recipe.moe_ft = config.phase(ft, mixture="decay", stage="decay", init_from=["mix"], overrides=MOE_MODEL)
    return c


def _flops(c) -> float:
    return decoder.flops_per_token(c.model, c.data.seq_len)
