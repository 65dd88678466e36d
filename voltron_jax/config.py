"""The config schema of voltron_jax: every default, recipe phases, overrides, loading and `validate`.

Config files (`configs/*.py`, or any file with `get_config(arg)`) start from `get_default()` and change
what they need; library code never calls `config.get(key, default)`. Unknown keys fail at override time
(ml_collections locks the dict), and `validate` rejects unknown technique names, impossible meshes and
inconsistent schedules before any compile, with a message that names the valid choices. The library
owns this schema: a checkpoint's saved config plus `complete()` is enough to rebuild a run anywhere.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from collections.abc import Mapping

import ml_collections

from voltron_jax import registry, schedules
from voltron_jax.data.orderings import ORDERINGS
from voltron_jax.errors import ConfigError
from voltron_jax.microbatch import ACC_DTYPES
from voltron_jax.models import decoder
from voltron_jax.recipe import HF_PREFIX, parents, phase_order, phase_steps, seed_phase
from voltron_jax.sharding import MESH_AXES, resolve_mesh

__all__ = ["ConfigError", "MESH_AXES", "apply_overrides", "complete", "get_default", "load", "phase"]

SCHEDULES = schedules.NAMES
REMAT_POLICIES = ("none", *decoder.REMAT_POLICIES)  # the policies are defined once, in decoder.py
DTYPES = ("float32", "bfloat16")
STAGES = ("stable", "decay")
ROUTER_INITS = ("random", "centroid")
# Sections whose keys are user-chosen names: kept as stored, never completed from the defaults.
FREE_FORM = ("recipe", "mixtures", "overrides")


def phase(
    steps: int,
    mixture: str = "pretrain",
    stage: str = "stable",
    init_from=(),
    surgery: str = "",
    keep_optimizer: bool = True,
    fan_out: int = 0,
    overrides: Mapping | None = None,
) -> ml_collections.ConfigDict:
    """One entry of `config.recipe`.

    Args:
      steps: optimizer steps of this phase (capped by `config.max_steps` when that is > 0).
      mixture: data mixture name (see voltron_jax/data/tasks.py), or 'cluster' for fan-out phases.
      stage: 'stable' (WSD warmup + constant) or 'decay' (WSD decay starts at this phase's first step).
      init_from: phases whose final checkpoints initialise this one (empty: scratch).
      surgery: name of a surgery function applied to the `init_from` params ('' = identity); its
        options are `config.surgery` (per phase via `overrides`, e.g. {"surgery.router_init": "random"}).
      keep_optimizer: carry the parent's optimizer state (only with exactly one parent and no surgery).
      fan_out: > 0 runs this phase as that many independent members (one per data cluster).
      overrides: config fields for this phase only, as data: dotted keys or nested mappings with values of
        the fields' own types, e.g. the MoE model of a fine-tune phase {"model.ffn": "moe",
        "model.attention": "moa"} or {"model": {"ffn": "moe"}}. Stored nested, so the command line reaches
        them too (`--config.recipe.moe_ft.overrides.model.moe.top_k=1`).
    """
    return ml_collections.ConfigDict(
        dict(
            steps=steps,
            mixture=mixture,
            stage=stage,
            fan_out=fan_out,
            overrides=nest(overrides or {}),
            init=dict(from_=",".join(init_from), surgery=surgery, keep_optimizer=keep_optimizer),
        )
    )


def get_default() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.max_steps = 0  # > 0 caps the steps of every phase (smoke tests, quick looks)

    # ---------------------------------------------------------------- model
    m = c.model = ml_collections.ConfigDict()
    m.vocab_size = 259  # seqio.ByteVocabulary: 256 bytes + PAD/EOS/UNK
    m.d_model = 256
    m.n_layers = 4
    m.n_heads = 4
    m.n_kv_heads = 4  # < n_heads: grouped-query attention
    m.head_dim = 0  # 0: d_model // n_heads
    m.d_ff = 768
    m.rope_theta = 10000.0
    m.norm_eps = 1e-6
    m.tie_embeddings = False
    m.dtype = "float32"  # compute dtype; params are always fp32
    # none | full | full_save_dispatch (full, but the grouped MoE/MoA all-to-alls are not redone) | dots
    # | dots_no_batch | dots_no_batch_rotated (the same, with q and k kept after RoPE instead of before)
    m.remat = "none"
    m.scan_layers = False
    m.attention_impl = "xla"  # xla | cudnn | auto (splash kernel on TPU, JAX picks elsewhere) | splash
    # MiniCPM / tensor-program parameterisation (techniques-b.md 2.3). Neutral values = plain pre-norm.
    m.scale_emb = 1.0  # h0 = scale_emb * embed(ids)
    m.scale_depth = 0.0  # > 0: residual branches scaled by scale_depth / sqrt(n_layers)
    m.dim_model_base = 0  # > 0: logits divided by d_model / dim_model_base; init and lr width-scaled
    m.init_std = 0.02  # 2-D weights ~ N(0, (init_std / sqrt(width factor))^2)
    # Technique slots (docs/design.md). Each slot class declares its hyperparameters' sub-dict and their
    # defaults next to its code (registry.Declared: model.bitlinear, .infini, .denseformer, .mod, .moe,
    # .moa, and any class registered later).
    for slot in registry.TABLES:
        m[slot] = registry.choices(slot)[0]
    for key, defaults in registry.config_defaults().items():
        m[key] = ml_collections.ConfigDict(defaults)

    # ---------------------------------------------------------------- data
    d = c.data = ml_collections.ConfigDict()
    d.corpus = "stdlib"  # stdlib (embedded) | tfds:<name> (e.g. tfds:c4/en); the mixture name 'corpus'
    d.tfds_data_dir = ""
    d.cache_dir = ""  # tokenised streams and trained vocabularies; empty: ~/.cache/voltron_jax
    d.vocab = "byte"  # byte | sentencepiece | tokenizers (a Hugging Face tokenizer.json: tokenizer_path)
    d.tokenizer_path = ""  # vocab=tokenizers: tokenizer.json or a HF checkpoint folder (data/vocab.py)
    d.spm_path = ""  # existing .model file; empty with vocab=sentencepiece trains one locally
    d.spm_vocab_size = 4096
    # token stores (ArrayRecord shards, data/shards.py): '' = <workdir>/data/tokens. ArrayRecord reads and
    # writes local files: with a bucket workdir give a local disk or a gcsfuse mount (/gcs/BUCKET/tokens)
    d.token_dir = ""
    d.granularity = "file"  # file | paragraph
    d.seq_len = 256
    d.batch_size = 16  # global
    d.doc_mask = False  # block attention across documents in a packed row
    # random: corpus order, contexts shuffled | icp: In-Context Pretraining order of the deduplicated corpus
    # (data/prepare.py) | dedup_random: the same deduplicated documents in a seeded random order (ablation);
    # the table: voltron_jax/data/orderings.py
    d.ordering = "random"
    d.val_fraction = 0.02
    d.shuffle_seed = 0
    d.mixtures = ml_collections.ConfigDict(
        dict(
            pretrain="corpus:1.0",  # "name:rate,...": corpus (= data.corpus), stdlib, pydoc, tfds:<name>, or
            decay="corpus:0.7,pydoc:0.3",  # any data.register_document_task name (ICP order, clusters)
        )
    )
    d.n_clusters = 8  # c-BTM clusters: one task per cluster; ICP orders each cluster on its own
    # Prepare (data/prepare.py): embedder shared by ICP and c-BTM. kind tfidf | hashing (streaming); dim:
    # SVD components (c-BTM used 100, see docs/data.md); fit_sample docs (chosen by a hash of their id) fit
    # the tf-idf, the SVD and the k-means.
    d.embed = ml_collections.ConfigDict(
        dict(kind="tfidf", dim=128, fit_sample=20000, min_df=2, max_features=2**17, seed=0)
    )
    # ICP (data/icp.py): kNN degree (the paper's 50 is for billions of documents: docs/data.md), FAISS index
    # auto | flat | ivf | hnsw (auto: exact up to flat_max docs per cluster), semantic dedup above a cosine
    # (0.99: checked by eye on stdlib, see data/icp.py), adjacent 3-gram Jaccard filter on the first
    # jaccard_chars characters (released ICP code: 0.85, 100).
    d.icp = ml_collections.ConfigDict(
        dict(
            knn=20,
            index="auto",
            dedup_threshold=0.99,
            jaccard_threshold=0.85,
            jaccard_chars=100,
            nprobe=16,
            hnsw_m=32,
            flat_max=200_000,
        )
    )
    # c-BTM balanced k-means (data/cbtm.py): iterations, auction eps as a fraction of the cost range.
    d.cbtm = ml_collections.ConfigDict(dict(iters=20, eps_frac=0.02, seed=0))

    # ---------------------------------------------------------------- optimizer
    o = c.optim = ml_collections.ConfigDict()
    o.lr = 3e-3
    o.b1 = 0.9
    o.b2 = 0.95
    o.eps = 1e-8
    o.weight_decay = 0.1
    o.wd_zero_step = -1  # >= 0: weight decay drops to 0 from this global step (BitNet recipe)
    o.lr_stage2_step = -1  # >= 0: lr multiplied by lr_stage2_factor from this step (BitNet two-stage)
    o.lr_stage2_factor = 1.0
    o.grad_clip = 1.0
    o.moments_dtype = "float32"  # Adam moments' storage: float32 | bfloat16 (half the memory; optim.py)
    o.mup_embed_lr = False  # MiniCPM scales the lr of every 2-D tensor; True also scales the embedding
    o.decay_embed = False  # weight decay on the token embedding (off: BitNet FAQ, OLMo 2; see optim.py)
    o.gate_lr = 1e-2  # Infini-attention gates: their own lr, no weight decay
    o.decay_alpha = False  # DenseFormer alpha weight decay (the paper's code decays them)

    # ---------------------------------------------------------------- schedule (global step)
    s = c.schedule = ml_collections.ConfigDict()
    s.name = "wsd"
    s.warmup = 20
    s.decay_shape = "exp"  # wsd decay: exp (half-life) | linear | cosine
    s.half_life = 0  # exp decay half-life in steps; 0: the one that ends the decay at final_frac * peak
    s.final_frac = 0.1  # lr at the end of the decay (and cosine floor) as a fraction of peak
    s.total = 0  # cosine length; 0: total steps of the recipe

    # ---------------------------------------------------------------- aux losses (summed by train.py)
    # z_loss: the logit z-loss of the LM head; the rest: each slot class's sown losses (registry.Declared).
    c.aux_weights = ml_collections.ConfigDict(dict(z_loss=1e-4, **registry.aux_loss_defaults()))

    # ---------------------------------------------------------------- mesh
    # dcn_data: slices the data axis spans (multislice: data = dcn_data x data per slice); 1 = one slice.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1, dcn_data=1))

    # ---------------------------------------------------------------- loop
    t = c.train = ml_collections.ConfigDict()
    t.log_every = 10
    t.eval_every = 100
    t.eval_batches = 4
    t.ckpt_every = 100
    t.keep = 2
    t.async_save = True
    t.peak_flops = 0.0  # per device; 0: guess from the backend (for MFU)
    t.profile_step = -1  # >= 0: trace global steps [profile_step, profile_step + profile_steps) into tb/
    t.profile_steps = 1  # (xplane; TensorBoard's Profile tab with the `profile` extra installed)
    # Weights & Biases (run/tracking.py; the `track` extra): off while wandb_project is empty; wandb_mode
    # online | offline | disabled ('' : WANDB_MODE, else online)
    t.wandb_project = ""
    t.wandb_entity = ""
    t.wandb_mode = ""
    t.eval_clusters = False  # also report validation loss per data cluster (needs data prepare)
    # Gradient accumulation (voltron_jax/microbatch.py): each step scans grad_accum_steps microbatches of
    # data.batch_size / grad_accum_steps rows; accumulator dtype float32 | bfloat16 | moments (that of
    # optim.moments_dtype)
    t.grad_accum_steps = 1
    t.grad_accum_dtype = "float32"
    t.prefetch = 2  # global batches built and put on device ahead of the step by a thread (0: off)
    # > 0: the cross-entropy applies the LM head this many vocabulary columns at a time and never builds
    # the fp32 [B,T,V] logits (voltron_jax/losses.py); 0: full logits. Same loss and gradients.
    t.loss_chunk = 0

    # ---------------------------------------------------------------- surgery (phases with init.surgery)
    # voltron_jax/surgery; techniques-b.md 5.1. Routers of a 'btx_merge': router_init random
    # (N(0, model.moe.router_init_std^2)) | centroid (column i = router_scale * (mu_i - mean mu) / |.|,
    # mu_i the mean router input of centroid_batches TRAINING batches of cluster i, i.e. of the branch
    # that becomes expert i, run through the randomly-routed merge). seed_expert: the branches' parent
    # phase (the seed) is one more, last expert, also averaged into the shared params; needs
    # model.moe.n_experts = model.moa.n_experts = branches + 1 (its router column stays random).
    c.surgery = ml_collections.ConfigDict(
        dict(router_init="random", centroid_batches=4, router_scale=1.0, seed_expert=False)
    )

    # ---------------------------------------------------------------- recipe
    c.recipe = ml_collections.ConfigDict()
    c.recipe.stable = phase(200, mixture="pretrain", stage="stable")
    c.recipe.decay = phase(40, mixture="decay", stage="decay", init_from=["stable"])
    return c


# --------------------------------------------------------------------------------------------- validate


def _fail(msg: str):
    raise ConfigError(msg)


def _valid(name: str, keys) -> str:
    """'valid: [...]' for an unknown field `name`, led by the nearest valid names (a typo's fix)."""
    keys = sorted(keys)
    near = difflib.get_close_matches(name, keys, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(map(repr, near))}? " if near else ""
    return f"{hint}valid: {keys}"


def _choice(name: str, value, choices):
    if value not in choices:
        _fail(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}.")


# --------------------------------------------------------------------------------------------- overrides


def flatten(overrides: Mapping, prefix: str = "") -> dict:
    """{dotted key: value} of a possibly nested mapping (dicts and ConfigDicts are sections)."""
    out = {}
    for key, value in overrides.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping | ml_collections.ConfigDict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def nest(overrides: Mapping) -> dict:
    """Nested dict of `overrides` (dotted keys split into sections)."""
    out: dict = {}
    for key, value in flatten(overrides).items():
        *path, leaf = key.split(".")
        node = out
        for p in path:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                _fail(f"override {key!r}: {p!r} is given both as a value and as a section.")
        node[leaf] = value
    return out


def _field_type_error(key: str, old, value):
    _fail(
        f"override {key}={value!r}: the field holds a {type(old).__name__} ({old!r}); give a "
        f"{type(old).__name__} value."
    )


def _typed(key: str, old, value):
    """`value` for field `key` whose current value is `old`: the same type (int -> float widens)."""
    if old is None or isinstance(old, ml_collections.FieldReference):
        return value
    if isinstance(old, bool) or isinstance(value, bool):
        if not (isinstance(old, bool) and isinstance(value, bool)):
            _field_type_error(key, old, value)
        return value
    if isinstance(old, float) and isinstance(value, int):
        return float(value)
    if isinstance(old, tuple | list) and isinstance(value, tuple | list):
        return type(old)(value)
    if type(old) is not type(value):
        _field_type_error(key, old, value)
    return value


def apply_overrides(c: ml_collections.ConfigDict, overrides: Mapping) -> ml_collections.ConfigDict:
    """A copy of `c` with `overrides` (dotted keys or nested mappings, typed values) applied.

    Raises ConfigError naming the valid fields for an unknown key and the expected type for a value of
    another type (an int is accepted for a float field)."""
    out = ml_collections.ConfigDict(c.to_dict())
    for key, value in flatten(overrides).items():
        *path, leaf = key.split(".")
        if path[:1] == ["recipe"] or key == "recipe":
            _fail(f"override {key!r}: a phase's overrides cannot change the recipe itself.")
        node = out
        for i, p in enumerate(path):
            if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
                where = ".".join(path[:i]) or "the config"
                _fail(f"override {key!r}: {p!r} is not a section of {where}; {_valid(p, node.keys())}.")
            node = node[p]
        if leaf not in node:
            _fail(f"override {key!r}: unknown field {leaf!r}; {_valid(leaf, node.keys())}.")
        if isinstance(node[leaf], ml_collections.ConfigDict):
            _fail(f"override {key!r} is a section; set its fields ({sorted(node[leaf].keys())}).")
        node[leaf] = _typed(key, node[leaf], value)
    return out


def parse_value(c: ml_collections.ConfigDict, key: str, text):
    """The value that command-line text `text` means for field `key` of `c` (its own type): for
    string-valued sweeps and flags. Booleans: true/false/1/0/yes/no; tuples as Python literals."""
    node = c
    for p in key.split(".")[:-1]:
        if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
            _fail(f"{key!r}: {p!r} is not a config section; {_valid(p, node.keys())}.")
        node = node[p]
    leaf = key.split(".")[-1]
    if leaf not in node:
        _fail(f"{key!r}: unknown field {leaf!r}; {_valid(leaf, node.keys())}.")
    if isinstance(node[leaf], ml_collections.ConfigDict):
        _fail(f"{key!r} is a section; set its fields ({sorted(node[leaf].keys())}).")
    old = node[leaf]
    if not isinstance(text, str):  # already a value (sweep files write typed values)
        return _typed(key, old, text)
    t = text.strip()
    try:
        if isinstance(old, bool):
            if t.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(t)
            return t.lower() in ("1", "true", "yes")
        if isinstance(old, int | float):
            return type(old)(ast.literal_eval(t)) if isinstance(old, float) else int(t)
        if isinstance(old, tuple | list):
            return type(old)(ast.literal_eval(t))
    except (ValueError, SyntaxError):
        _fail(f"{key}={text!r}: not a {type(old).__name__} (the field holds {old!r}).")
    return t


def phase_config(c: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """The config phase `name` runs with: `recipe.<name>.overrides` applied."""
    return apply_overrides(c, c.recipe[name].overrides)


# --------------------------------------------------------------------------------------------- loading


def load(spec: str | os.PathLike, relative_to: str | os.PathLike | None = None) -> ml_collections.ConfigDict:
    """The ConfigDict of config file `spec` = "path/to/file.py[:arg]", as `--config=` would load it.

    `relative_to`: resolve a relative path against this file's folder (a config building on a sibling:
    `config.load("tiny.py:test", relative_to=__file__)`) instead of the working directory."""
    path, _, arg = str(spec).partition(":")
    if relative_to is not None and not os.path.isabs(path):
        path = os.path.join(os.path.dirname(os.path.abspath(relative_to)), path)
    if not os.path.isfile(path):
        _fail(f"config file {path!r} does not exist; pass a path to a .py file with get_config(arg).")
    name = "voltron_config_" + os.path.splitext(os.path.basename(path))[0]
    mod_spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(mod)
        if not hasattr(mod, "get_config"):
            _fail(f"config file {path!r} has no get_config(arg) function.")
        return mod.get_config(arg) if arg else mod.get_config()
    except ConfigError:
        raise
    except Exception as e:  # a bug or a bad variant in the user's file: name the file, keep the cause
        where = f" line {e.lineno}" if isinstance(e, SyntaxError) else ""
        raise ConfigError(f"config file {spec!r}{where}: {type(e).__name__}: {e}") from e


def _complete(stored: dict, defaults: ml_collections.ConfigDict) -> None:
    for key, value in defaults.items():
        if key not in stored:
            stored[key] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
        elif isinstance(value, ml_collections.ConfigDict) and isinstance(stored[key], dict):
            if key not in FREE_FORM:
                _complete(stored[key], value)


def _legacy_overrides(text: str, c: ml_collections.ConfigDict) -> dict:
    """Overrides stored as "a.b=v,c.d=v" by checkpoints written before overrides became data."""
    pairs = [item.partition("=") for item in text.split(",") if item.strip()]
    return nest({k.strip(): parse_value(c, k.strip(), v) for k, _, v in pairs})


def complete(stored: Mapping) -> ml_collections.ConfigDict:
    """A run's resolved config from its stored dict (config.json, checkpoint metadata): fields that a newer
    voltron_jax added take their defaults; phase overrides stored as strings by older versions become
    data."""
    stored = ml_collections.ConfigDict(dict(stored)).to_dict()
    _complete(stored, get_default())
    c = ml_collections.ConfigDict(stored)
    for name in c.recipe:
        ph = c.recipe[name]
        if isinstance(ph.get("overrides"), str):
            with ph.unlocked():
                del ph["overrides"]
                ph.overrides = _legacy_overrides(stored["recipe"][name]["overrides"], c)
    return c


def validate(c: ml_collections.ConfigDict, n_devices: int | None = None) -> ml_collections.ConfigDict:
    """Reject configs that cannot run, before any compile. Returns the config for chaining."""
    m = c.model
    for slot in registry.TABLES:  # the names registered in voltron_jax/registry.py
        _choice(f"model.{slot}", m[slot], registry.choices(slot))
    _choice("model.dtype", m.dtype, DTYPES)
    _choice("model.remat", m.remat, REMAT_POLICIES)
    _choice("model.attention_impl", m.attention_impl, ("xla", "cudnn", "auto", "splash"))
    if m.d_model <= 0 or m.n_layers <= 0 or m.d_ff <= 0:
        _fail("model.d_model, model.n_layers and model.d_ff must be positive.")
    if m.n_heads < 1 or m.n_kv_heads < 1 or m.head_dim < 0:
        _fail(f"model.n_heads={m.n_heads} and model.n_kv_heads={m.n_kv_heads} must be >= 1 (head_dim >= 0).")
    if m.head_dim == 0 and m.d_model % m.n_heads:
        _fail(f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; set model.head_dim.")
    if m.n_heads % m.n_kv_heads:
        _fail(f"model.n_heads={m.n_heads} must be a multiple of model.n_kv_heads={m.n_kv_heads}.")
    if m.vocab_size <= 0:
        _fail("model.vocab_size must be positive.")

    if c.max_steps < 0:
        _fail(f"max_steps={c.max_steps} must be >= 0 (0: every phase runs its recipe steps; N caps them).")

    d = c.data
    _choice("data.vocab", d.vocab, ("byte", "sentencepiece", "tokenizers"))
    if d.vocab == "tokenizers" and not d.tokenizer_path:
        _fail(
            "data.vocab='tokenizers' needs data.tokenizer_path (a tokenizer.json or a HF checkpoint folder)."
        )
    _choice("data.ordering", d.ordering, tuple(ORDERINGS))
    _choice("data.embed.kind", d.embed.kind, ("tfidf", "hashing"))
    _choice("data.icp.index", d.icp.index, ("auto", "flat", "ivf", "hnsw"))
    if d.n_clusters < 1 or d.icp.knn < 1 or d.embed.dim < 1 or d.embed.fit_sample < 3:
        _fail("data.n_clusters, data.icp.knn and data.embed.dim must be >= 1 and data.embed.fit_sample >= 3.")
    if not 0.0 < d.icp.dedup_threshold <= 1.0 or not 0.0 < d.icp.jaccard_threshold <= 1.0:
        _fail(
            "data.icp.dedup_threshold and data.icp.jaccard_threshold must be in (0, 1]; 1.0 turns the "
            "filter off."
        )
    _choice("data.granularity", d.granularity, ("file", "paragraph"))
    if not (d.corpus in ("stdlib", "python_docs") or d.corpus.startswith("tfds:")):
        _fail(
            f"data.corpus={d.corpus!r}: use 'stdlib' (embedded), 'python_docs' (apt-get install "
            "python3.11-doc) or 'tfds:<name>' such as 'tfds:c4/en'."
        )
    if d.seq_len <= 1 or d.batch_size <= 0:
        _fail("data.seq_len must be > 1 and data.batch_size > 0.")

    if c.train.loss_chunk < 0:
        _fail(f"train.loss_chunk={c.train.loss_chunk} must be >= 0 (vocabulary columns per tile; 0: off).")

    _choice("schedule.name", c.schedule.name, SCHEDULES)
    _choice("schedule.decay_shape", c.schedule.decay_shape, ("exp", "linear", "cosine"))
    if c.optim.lr <= 0:
        _fail("optim.lr must be positive.")
    for key in ("schedule.warmup", "schedule.half_life", "schedule.total", "optim.weight_decay"):
        section, field = key.split(".")
        if c[section][field] < 0:
            _fail(f"{key}={c[section][field]} must be >= 0.")
    if not 0.0 <= c.schedule.final_frac <= 1.0 or c.optim.gate_lr <= 0 or c.optim.lr_stage2_factor < 0:
        _fail("schedule.final_frac must lie in [0, 1], optim.gate_lr > 0 and optim.lr_stage2_factor >= 0.")
    if not 0.0 <= d.val_fraction < 1.0:
        _fail(f"data.val_fraction={d.val_fraction} must lie in [0, 1).")

    for name in c.aux_weights:
        if c.aux_weights[name] < 0:
            _fail(f"aux_weights.{name} must be >= 0.")

    _choice("surgery.router_init", c.surgery.router_init, ROUTER_INITS)
    if c.surgery.centroid_batches < 1 or c.surgery.router_scale <= 0:
        _fail("surgery.centroid_batches must be >= 1 and surgery.router_scale > 0.")

    t = c.train
    _choice("train.grad_accum_dtype", t.grad_accum_dtype, ACC_DTYPES)
    if t.grad_accum_steps < 1 or d.batch_size % t.grad_accum_steps:
        _fail(
            f"train.grad_accum_steps={t.grad_accum_steps} must be >= 1 and divide data.batch_size="
            f"{d.batch_size} (each step scans that many equal microbatches); change either."
        )
    for key in ("log_every", "eval_every", "ckpt_every", "eval_batches", "keep"):  # steps and counts
        if t[key] < 1:
            _fail(f"train.{key}={t[key]} must be >= 1 (steps between two events, or a count).")
    if t.profile_steps < 1:
        _fail(f"train.profile_steps={t.profile_steps} must be >= 1 (steps traced from train.profile_step).")
    if t.prefetch < 0:
        _fail(f"train.prefetch={t.prefetch} must be >= 0 (batches prepared ahead; 0 turns prefetch off).")

    _validate_recipe(c)

    if n_devices is not None:
        validate_mesh(c, n_devices)

    # Technique modules add their own checks (registered by slot in voltron_jax/registry.py).
    registry.validate_slots(c)
    return c


def validate_mesh(c: ml_collections.ConfigDict, n_devices: int) -> None:
    """The checks that need the device count: the mesh fits `n_devices` and divides the batch and heads."""
    d, m, t = c.data, c.model, c.train
    sizes = resolve_mesh(c.mesh, n_devices)
    batch_shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    if d.batch_size % batch_shards:
        _fail(
            f"data.batch_size={d.batch_size} is not divisible by the {batch_shards} batch shards "
            f"(mesh data x fsdp x expert = {sizes}); change the batch size or the mesh."
        )
    micro = d.batch_size // t.grad_accum_steps
    if t.grad_accum_steps > 1 and micro % batch_shards:
        _fail(
            f"the microbatch data.batch_size / train.grad_accum_steps = {micro} is not divisible by "
            f"the {batch_shards} batch shards (mesh data x fsdp x expert = {sizes}); use fewer "
            "accumulation steps, a larger batch or a smaller mesh."
        )
    heads_shards = sizes["tensor"]
    if m.n_kv_heads % heads_shards or m.n_heads % heads_shards or m.d_ff % heads_shards:
        _fail(f"mesh.tensor={heads_shards} must divide model.n_heads, model.n_kv_heads and model.d_ff.")


def _validate_recipe(c):
    recipe, sched = c.recipe, c.schedule
    if not len(recipe):
        _fail("recipe is empty; add at least one phase (see voltron_jax.config.phase).")
    order = phase_order(recipe)
    decay_phases = []
    for name in order:
        ph = recipe[name]
        _choice(f"recipe.{name}.stage", ph.stage, STAGES)
        if ph.steps < 0:
            _fail(f"recipe.{name}.steps must be >= 0.")
        if ph.mixture != "cluster" and ph.mixture not in c.data.mixtures:
            _fail(
                f"recipe.{name}.mixture={ph.mixture!r} is not defined; data.mixtures has "
                f"{sorted(c.data.mixtures.keys())} (or use 'cluster' with fan_out)."
            )
        if ph.init.keep_optimizer and ph.init.surgery and parents(ph):
            _fail(
                f"recipe.{name}: keep_optimizer needs the parent's tree unchanged; set "
                f"init.keep_optimizer=False when init.surgery={ph.init.surgery!r}."
            )
        _validate_hf_init(name, ph)
        if len(parents(ph)) > 1 and not ph.init.surgery:
            _fail(f"recipe.{name} has several parents {parents(ph)} but no init.surgery to merge them.")
        fanned = [p for p in parents(ph) if p in recipe and recipe[p].fan_out]
        if fanned and not ph.init.surgery and ph.fan_out != recipe[fanned[0]].fan_out:
            _fail(
                f"recipe.{name} starts from the fan-out phase {fanned[0]!r} ({recipe[fanned[0]].fan_out} "
                f"members) without init.surgery: give it fan_out={recipe[fanned[0]].fan_out} (member i "
                "continues member i) or a surgery that merges the members (e.g. 'btx_merge')."
            )
        if ph.stage == "decay":
            decay_phases.append(name)
        pc = apply_overrides(c, ph.overrides)
        if ph.init.surgery and parents(ph):
            _validate_surgery(c, name, pc)
    if sched.name == "wsd":
        first = order[0]
        if sched.warmup > phase_steps(recipe[first], c.max_steps) and c.max_steps <= 0:
            _fail(
                f"schedule.warmup={sched.warmup} is longer than the first phase "
                f"{first!r} ({recipe[first].steps} steps); shorten the warmup or lengthen the phase."
            )
        for name in decay_phases:
            if recipe[name].steps == 0:
                _fail(f"recipe.{name} is a decay phase with 0 steps; give it steps or stage='stable'.")
    elif decay_phases:
        _fail(
            f"recipe phases {decay_phases} have stage='decay', which needs schedule.name='wsd' "
            f"(got {sched.name!r})."
        )


def _validate_hf_init(name: str, ph) -> None:
    """init.from_='hf:/path': one Hugging Face checkpoint folder, alone, no surgery (recipe.hf_source)."""
    entries = [p for p in ph.init.from_.split(",") if p]
    hf = [p for p in entries if p.startswith(HF_PREFIX)]
    if not hf:
        return
    if len(entries) > 1 or ph.init.surgery:
        _fail(
            f"recipe.{name}.init.from_={ph.init.from_!r}: a Hugging Face checkpoint initialises a phase "
            "alone and without surgery; start a dense phase from it and branch or upcycle that phase."
        )
    # the folder itself is read (and checked) when the phase starts: a finished phase no longer needs it


def _validate_surgery(c, name: str, pc):
    """Surgery options of merge phase `name` (its own config `pc`): known values, expert counts."""
    recipe, ph, s = c.recipe, c.recipe[name], pc.surgery
    _choice(f"recipe.{name}: surgery.router_init", s.router_init, ROUTER_INITS)
    if ph.init.surgery != "btx_merge":
        if s.router_init != "random" or s.seed_expert:
            _fail(
                f"recipe.{name}: surgery.router_init={s.router_init!r} / "
                f"surgery.seed_expert={s.seed_expert} apply to init.surgery='btx_merge' only, "
                f"not {ph.init.surgery!r}; set them back to 'random' / False for this phase "
                f"(recipe.{name}.overrides)."
            )
        return
    if s.router_init == "centroid":
        for p in parents(ph):
            if not recipe[p].fan_out:
                _fail(
                    f"recipe.{name}: surgery.router_init='centroid' needs every parent to be a fan-out "
                    f"phase (member i trains on data cluster i and becomes expert i); {p!r} is not."
                )
    if s.seed_expert:
        seed_phase(recipe, name)
    branches = sum(recipe[p].fan_out or 1 for p in parents(ph))
    want = branches + int(s.seed_expert)
    for slot, sub in (("ffn", "moe"), ("attention", "moa")):
        if pc.model[slot] == sub and pc.model[sub].n_experts != want:
            seed = " + 1 seed expert (surgery.seed_expert)" if s.seed_expert else ""
            _fail(
                f"recipe.{name}: {branches} branches{seed} make {want} experts, but "
                f"model.{sub}.n_experts={pc.model[sub].n_experts}; set model.moe.n_experts and "
                f"model.moa.n_experts to {want}."
            )
