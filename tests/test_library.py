"""voltron_jax is a self-contained library: no import circles, never imports `configs`, works installed.

The wheel test builds the package, installs it (not editable) into a fresh virtualenv and, from a
directory outside the repository, trains 3 steps of a config file given by absolute path, then loads the
run with `voltron_jax.load` and generates.
"""

import ast
import glob
import os
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "voltron_jax")
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ""}


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _modules() -> dict[str, str]:
    files = glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True)
    return {_module_name(f): f for f in files if not f.endswith("__main__.py")}


def _imports(name: str, path: str, known: set[str]) -> set[str]:
    """The voltron_jax modules that module `name` imports anywhere in its body (also inside functions)."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            subs = [f"{base}.{a.name}" for a in node.names]
            # `from pkg import submodule` imports the submodule; pkg/__init__ runs first for any submodule
            # (not an edge of its own, or every package that imports its submodules would be a circle)
            targets = subs if all(t in known for t in subs) else [base] + subs
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import voltron_jax.models.decoder as d` -> the module itself
                t = t.rpartition(".")[0]
            if t and t != name and t != "voltron_jax":  # the package __init__ imports nothing eagerly
                out.add(t)
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of `graph`, or [] (iterative DFS with colours)."""
    state: dict[str, int] = {}
    for root in sorted(graph):
        if root in state:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        state[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child) :] + [child]
            elif child not in state:
                state[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(graph.get(child, ())))))
    return []


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_import_circle_among_voltron_jax_modules():
    mods = _modules()
    graph = {name: _imports(name, path, set(mods)) for name, path in mods.items()}
    assert graph["voltron_jax.train"] >= {
        "voltron_jax.config",
        "voltron_jax.run.checkpoint",
    }  # the walk works
    assert _cycle(graph) == [], " -> ".join(_cycle(graph))


@pytest.mark.slow
def test_the_library_never_imports_configs(tmp_path):
    """Every voltron_jax module imported from outside the repository, `configs` never among them."""
    # Command-line modules that define absl flags at import share one flag namespace: main and evaluate
    # both define --workdir, so evaluate goes into a process of its own.
    own = ["voltron_jax.experiments.evaluate"]
    names = sorted(n for n in _modules() if n != "voltron_jax" and n not in own)
    for group in (names, own):
        code = (
            "import importlib, sys\n"
            f"for name in {group!r}:\n"
            "    importlib.import_module(name)\n"
            "assert 'configs' not in sys.modules, [m for m in sys.modules if m.startswith('configs')]\n"
            "print('ok', len(sys.modules))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600
        )
        assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-3000:]


@pytest.mark.slow
def test_the_core_never_imports_the_interop_packages(tmp_path):
    """train, config, the models and the data pipeline run without the optional extra 'interop': importing
    them loads none of transformers, torch, safetensors, tokenizers or lm_eval (only voltron_jax/interop/
    and the 'tokenizers' vocabulary import them, inside the functions that need them)."""
    heavy = ("transformers", "torch", "safetensors", "tokenizers", "lm_eval")
    code = (
        "import sys\n"
        "import voltron_jax.train, voltron_jax.config, voltron_jax.models.decoder\n"
        "import voltron_jax.data.vocab, voltron_jax.data.pipeline, voltron_jax.inference.api\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r})\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-3000:]


@pytest.mark.slow
def test_a_byte_run_on_the_embedded_corpus_never_imports_tensorflow(tmp_path):
    """Both phases of the tiny recipe (data, training, evaluations, TensorBoard events, checkpoints) on the
    byte vocabulary load neither TensorFlow nor seqio: their import was 10-25 s of every process's start
    on a 2-core host (voltron_jax/data/tasks.py `uses_tensorflow` says which runs need them)."""
    argv = [
        "voltron",
        f"--config={ROOT}/configs/tiny.py",
        f"--workdir={tmp_path}/run",
        f"--config.data.cache_dir={tmp_path}/cache",
        *("--config.recipe.stable.steps=3", "--config.recipe.decay.steps=1", "--config.schedule.warmup=1"),
        *("--config.data.batch_size=8", "--config.train.eval_every=2"),
    ]
    code = (
        "import runpy, sys\n"
        f"sys.argv = {argv!r}\n"
        "try:\n"
        "    runpy.run_module('voltron_jax.main', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'seqio'))\n"
        "assert not bad, bad[:5]\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0 and out.stdout.endswith("ok\n"), (out.stdout[-2000:], out.stderr[-3000:])
    assert list((tmp_path / "run" / "01_decay" / "tb").glob("events.out.tfevents*"))


def _fresh_venv(tmp_path) -> str:
    """A new virtualenv whose only voltron_jax is the wheel built from this checkout. Its dependencies come
    from this interpreter's site-packages through a plain path line (.pth files there, such as an editable
    install's finder, are not processed), so the test needs no network and no 3 GB install."""
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, ROOT],
        check=True,
        env=ENV,
        timeout=600,
    )
    (wheel,) = glob.glob(str(dist / "voltron_jax-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=300)
    py = str(venv / "bin" / "python")
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    with open(os.path.join(site, "_deps_from_test_env.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(  # this pip installs into the fresh environment (console script included)
        [sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index", wheel],
        check=True,
        env=ENV,
        timeout=600,
    )
    return py


@pytest.mark.slow
@pytest.mark.heavy  # a multi-process end-to-end run: make test-heavy (CI runs it), keeping make test < 15 min
def test_wheel_in_a_fresh_virtualenv_trains_loads_and_generates(tmp_path):
    py = _fresh_venv(tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()

    def run(*args, timeout=900):
        out = subprocess.run(args, cwd=work, env=ENV, capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
        return out.stdout

    where = run(py, "-c", "import voltron_jax; print(voltron_jax.__file__)")
    assert where.strip().startswith(str(tmp_path / "venv")), where  # the wheel, not this checkout
    voltron = str(tmp_path / "venv" / "bin" / "voltron")
    usage = run(voltron, "--help")
    assert "--workdir" in usage and "--config" in usage and "--only_phase" in usage
    config = os.path.join(ROOT, "configs", "tiny.py") + ":test"
    run(voltron, f"--config={config}", "--workdir=run", "--config.max_steps=3")
    text = run(
        py,
        "-c",
        "import sys, voltron_jax\n"
        "lm = voltron_jax.load('run')\n"
        "out = lm.generate('def ', max_new_tokens=8, temperature=0.0)\n"
        "assert 'configs' not in sys.modules\n"
        "print(lm.step, repr(out))\n",
    )
    step, generated = text.split(maxsplit=1)
    assert int(step) == 6 and len(eval(generated)) > 0  # stable 3 + decay 3 steps (max_steps caps each)
