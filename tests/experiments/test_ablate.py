"""The ablation tool: sweep parsing, --emit, real few-step runs collected into a table/CSV/plot, resume."""

import csv

import pytest

from configs import tiny
from voltron_jax import config as cfglib
from voltron_jax.experiments import ablate


def test_sweep_grid_and_bad_field_names_list_valid_ones():
    c = tiny.get_config()
    vs = ablate.parse_sweeps(c, ["model.linear=dense,bitlinear", "model.routing=none,mod"], seeds=3)
    assert [v.name for v in vs] == [
        "linear=dense+routing=none",
        "linear=dense+routing=mod",
        "linear=bitlinear+routing=none",
        "linear=bitlinear+routing=mod",
    ]
    assert vs[3].overrides == {"model.linear": "bitlinear", "model.routing": "mod"} and vs[0].seeds == [
        0,
        1,
        2,
    ]
    with pytest.raises(cfglib.ConfigError, match=r"does not exist; valid fields of model: .*'linear'"):
        ablate.parse_sweeps(c, ["model.lineer=dense"], seeds=1)
    with pytest.raises(cfglib.ConfigError, match="not a config section"):
        ablate.parse_sweeps(c, ["modl.linear=dense"], seeds=1)
    with pytest.raises(cfglib.ConfigError, match="must look like"):
        ablate.parse_sweeps(c, ["model.linear"], seeds=1)


def test_emit_prints_one_command_per_run(capsys, tmp_path):
    ablate.main(
        [
            "--config=configs/tiny.py",
            "--sweep",
            "model.linear=dense,bitlinear",
            "--seeds",
            "2",
            "--set",
            "max_steps=5",
            f"--workdir={tmp_path}",
            "--emit",
        ]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    assert all(
        "-m voltron_jax.main --config=configs/tiny.py" in x and "--config.max_steps=5" in x for x in lines
    )
    assert sum("--config.model.linear=bitlinear" in x for x in lines) == 2
    assert {x.split("--config.seed=")[1].split()[0] for x in lines} == {"0", "1"}
    assert not list(tmp_path.iterdir())  # nothing ran


@pytest.mark.slow
@pytest.mark.heavy  # a multi-process end-to-end run: make test-heavy (CI runs it), keeping make test < 15 min
def test_real_runs_collect_table_csv_plot_and_resume(tmp_path, capsys):
    args = [
        "--config=configs/tiny.py:test",
        "--sweep",
        "model.tie_embeddings=false,true",
        "--set",
        "max_steps=3",
        "--set",
        "train.eval_every=2",
        f"--workdir={tmp_path}",
    ]
    ablate.main(args)
    for f in ("results.md", "results.csv", "losses.png"):
        assert (tmp_path / f).exists()
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["variant"] for r in rows] == ["tie_embeddings=false", "tie_embeddings=true"]
    untied, tied = rows
    assert int(untied["params"]) - int(tied["params"]) == 64 * 259  # the untied LM head
    assert float(untied["final_loss"]) < 5.6 and untied["seeds"] == "1"
    assert float(untied["flops_per_token"]) == float(tied["flops_per_token"])
    capsys.readouterr()
    ablate.main(args)  # resumable: finished variants are skipped
    assert capsys.readouterr().out.count("done, skipped") == 2


@pytest.mark.slow
def test_model_stats_of_an_infini_variant_and_of_a_recipe():
    """Stats trace the model at the config's own length (Infini-attention takes only whole segments); a
    recipe is described by its last phase's model and has no FLOPs-from-steps comparison."""
    n, fpt, tokens, comparable = ablate.model_stats(
        "configs/tiny.py:test", {"model.memory": "infini", "model.infini.segment_len": 32}
    )
    plain, _, _, plain_comparable = ablate.model_stats("configs/tiny.py:test", {})
    assert n > plain and fpt > 0 and tokens == 8 * 64 and comparable and plain_comparable
    seed, *_ = ablate.model_stats("configs/recipe_tiny.py:continue", {})
    moe, _, _, recipe_comparable = ablate.model_stats("configs/recipe_tiny.py", {})
    assert moe > 2 * seed and not recipe_comparable


def test_main_grammar_comma_list_and_list_literal_are_axes_one_value_is_fixed():
    c = ablate.load_config("configs/tiny.py")
    flags = [
        ("model.linear", "dense,bitlinear"),
        ("model.routing", "[none, mod]"),
        ("optim.lr", "[1e-3, 3e-3]"),
        ("max_steps", "5"),
        ("data.mixtures.decay", "corpus:0.7,pydoc:0.3"),  # a comma inside a mixture spec is its value
        ("data.mixtures.pretrain", '["corpus:1.0", "corpus:0.5,pydoc:0.5"]'),  # sweep it with a list
    ]
    axes, fixed = ablate.split_config_flags(c, flags)
    assert axes == [
        ("model.linear", ["dense", "bitlinear"]),
        ("model.routing", ["none", "mod"]),
        ("optim.lr", ["0.001", "0.003"]),
        ("data.mixtures.pretrain", ["corpus:1.0", "corpus:0.5,pydoc:0.5"]),
    ]
    assert fixed == {"max_steps": "5", "data.mixtures.decay": "corpus:0.7,pydoc:0.3"}
    variants = ablate.parse_sweeps(c, [], seeds=1, axes=axes)
    assert len(variants) == 16 and variants[0].overrides["model.linear"] == "dense"
    with pytest.raises(cfglib.ConfigError, match="valid fields"):
        ablate.split_config_flags(c, [("model.lineer", "dense,bitlinear")])


def test_emit_with_main_grammar(capsys, tmp_path):
    ablate.main(
        [
            "--config=configs/tiny.py",
            "--config.model.linear=dense,bitlinear",
            "--config.max_steps=5",
            f"--workdir={tmp_path}",
            "--emit",
        ]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all("--config.max_steps=5" in x for x in lines)
    assert sorted(x.split("--config.model.linear=")[1].split()[0] for x in lines) == ["bitlinear", "dense"]
    with pytest.raises(cfglib.ConfigError, match="not a config section|valid"):
        ablate.main(["--config=configs/tiny.py", "--config.modl.x=1,2", f"--workdir={tmp_path}", "--emit"])


def test_children_get_the_sweeps_compilation_cache_unless_one_is_set(tmp_path, monkeypatch):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
    env = ablate.child_env(tmp_path)
    assert env["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "xla_cache")
    assert env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] == "0"  # every program, however fast
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "")  # the user's choice (here: no cache) wins
    assert ablate.child_env(tmp_path)["JAX_COMPILATION_CACHE_DIR"] == ""


@pytest.mark.slow
@pytest.mark.heavy  # 2 real training processes: ~3 min on the loaded 2-core host (make test-heavy)
def test_a_sweep_shares_one_compilation_cache_and_a_cached_program_trains_the_same(tmp_path, monkeypatch):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)  # the suite's own cache (conftest)
    arm = ablate.Variant("dense", {"max_steps": "3", "train.eval_every": "3"}, [0])
    ablate.run_all("configs/tiny.py:test", [arm], {}, tmp_path / "a", emit=False)  # compiles, fills the cache
    cache = tmp_path / "a" / ablate.XLA_CACHE
    entries = sorted(p.name for p in cache.iterdir())
    assert any(n.startswith("jit_train_step") or "step" in n for n in entries), entries
    # The same run elsewhere, reading that cache: every program it compiles is already there (a missed key
    # would add an entry), and it trains to exactly the same losses.
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(cache))
    ablate.run_all("configs/tiny.py:test", [arm], {}, tmp_path / "b", emit=False)
    assert sorted(p.name for p in cache.iterdir()) == entries
    assert not (tmp_path / "b" / ablate.XLA_CACHE).exists()  # a cache already set wins
    fresh, cached = (ablate.read_run(ablate.run_dir(tmp_path / r, arm, 0)) for r in ("a", "b"))
    for kind in ("train", "eval"):
        assert [r["loss"] for r in cached[kind]] == [r["loss"] for r in fresh[kind]]
    assert len(fresh["train"]) >= 1 and len(fresh["eval"]) >= 1
