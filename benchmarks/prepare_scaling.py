"""Throughput and memory of the data preparation (voltron_jax/data/prepare.py) as the corpus grows.

    python benchmarks/prepare_scaling.py --sizes=10000,30000,100000 [--json=out.jsonl] \
        [--overrides=data.icp.index=hnsw,data.embed.kind=hashing]

Documents: paragraph-level pieces (corpus.paragraphs) of every .py file of the interpreter's standard
library INCLUDING its test suite (~103k paragraphs for CPython 3.11; the training corpus excludes the
tests, which leaves ~36k). For each size N the N paragraphs of smallest sample rank (a hash of the id,
so every size is a spread over the whole library, not its first packages) plus a 2% validation split run
through `prepare` with configs/tiny.py defaults in a fresh subprocess, which reports per-phase wall and CPU
seconds, documents/s and the peak resident memory of that process.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def records(n: int) -> list[dict]:
    from voltron_jax.data import corpus, embed

    base = corpus.stdlib_root()
    skip = corpus.EXCLUDED_DIRS - {"test", "tests", "idle_test"}
    docs = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for f in sorted(filenames):
            if not f.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), base)
            try:
                text = open(os.path.join(dirpath, f), encoding="utf-8").read()
            except (UnicodeDecodeError, OSError):
                continue
            docs += [(f"{rel}#{i}", p) for i, p in enumerate(corpus.paragraphs(text))]
    docs.sort(key=lambda d: embed.sample_rank(d[0], 0))
    docs = sorted(docs[:n], key=lambda d: d[0])
    return [
        dict(index=i, id=d, text=t, split=corpus.split_of(d.split("#")[0], 0.02))
        for i, (d, t) in enumerate(docs)
    ]


def child(n: int, overrides: str) -> None:
    from voltron_jax import config as config_lib
    from voltron_jax.data import prepare

    recs = records(n)
    config = config_lib.load(os.path.join(ROOT, "configs", "tiny.py"))
    pairs = [item.partition("=") for item in overrides.split(",") if item]
    config = config_lib.apply_overrides(
        config, {k: config_lib.parse_value(config, k, v) for k, _, v in pairs}
    )
    with tempfile.TemporaryDirectory() as tmp:
        stats = prepare.prepare(config, tmp, records=recs, progress=False, register=False)
    stats["n_docs"] = len(recs)
    stats["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(stats))


def main() -> None:
    args = dict(a.lstrip("-").split("=", 1) for a in sys.argv[1:])
    if "child" in args:
        return child(int(args["child"]), args.get("overrides", ""))
    rows = []
    for n in map(int, args.get("sizes", "10000,100000").split(",")):
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        out = subprocess.run(
            [sys.executable, __file__, f"--child={n}", f"--overrides={args.get('overrides', '')}"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        stats = json.loads(out.split("RESULT ", 1)[1])
        rows.append(stats)
        if "json" in args:
            with open(args["json"], "a") as f:
                f.write(json.dumps(stats) + "\n")
        sec, cpu, dps = stats["seconds"], stats["cpu_seconds"], stats["docs_per_s"]
        phases = [p for p in sec if p != "icp_parts"]
        print(
            f"N={stats['n_docs']} kept={stats['docs']['kept']} peak RSS {stats['peak_rss_mib']:.0f} MiB; "
            f"total wall {sum(sec[p] for p in phases):.1f} s, cpu {sum(cpu.values()):.1f} s",
            flush=True,
        )
        for p in phases:
            print(f"  {p:13s} wall {sec[p]:7.2f} s  cpu {cpu[p]:7.2f} s  {dps[p]:10.0f} docs/s")
        print("  icp parts (wall): " + ", ".join(f"{k} {v:.2f} s" for k, v in sec["icp_parts"].items()))
        print(
            "  "
            + "\n  ".join(
                __import__("voltron_jax.data.prepare", fromlist=["x"]).format_report(stats).splitlines()[:4]
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
