"""Token stores + Grain reader at corpus scale: write time, input-pipeline tokens/s, restore time, peak RSS.

    python benchmarks/data_pipeline.py --sizes_mb=200,1000 --vocabs=byte,sentencepiece \
        --workdir=/tmp/voltron_bench [--json=out.jsonl] [--seq_len=4096 --batch=32 --batches=40]

For each (size, vocabulary): a synthetic corpus of natural-looking documents (Zipf-distributed pseudo
words in sentences and paragraphs, lognormal document lengths, seeded: the same bytes every run) is
generated on the fly and written as one token store by the step that ends the data preparation
(shards.StoreWriter: tokenise in the final order, ArrayRecord shards, index last), in a fresh process
(its wall time and peak RSS are reported). The SentencePiece model is trained once by the project's
trainer on a deterministic line sample of the first 20 MB (vocab.sample_lines / train_sentencepiece).
Then a second fresh process serves the store through the train loop's own iterator
(pipeline.make_train_iterator over a task registered on the store, Grain MapDataset, shuffled rows)
and reports: tokens/s of host batches (`--batch` x `--seq_len`, the model step excluded), the time to
restore the iterator (make the iterator, set_state, first batch) at 1%, 50% and 90% of the corpus, and
its peak RSS. The ICP/c-BTM stages before the tokenisation are measured by benchmarks/prepare_scaling.py.

The whole preparation (stage `prepare`, not part of the default --stages):

    python benchmarks/data_pipeline.py --stages=prepare --sizes_mb=200,1000 --modes=inproc,beam \
        --vocabs=byte,sentencepiece --workdir=/tmp/voltron_bench [--json=out.jsonl]

writes the same synthetic corpus once as JSONL records {index, id, text, split} (1% validation) and runs
the data preparation end to end on it with configs/tiny.py (data.ordering='icp', 8 clusters, tf-idf,
exact kNN up to 200k documents per cluster; SentencePiece: 8,000 pieces trained by the preparation on a
line sample of the kept documents), in a fresh process per row:
  inproc  load the JSONL into records, prepare.prepare (dedup, fit, embed, assign, ICP, JSONL, marker,
          token stores); with both vocabularies, ONE run: the byte row is that whole preparation, the
          SentencePiece row is the same run's stages before tokenisation plus `prepare.tokenize` with
          SentencePiece right after it (SentencePiece training included); the vocabulary is not part of
          the fingerprint, so those stages are the same computation.
  beam    the Beam pipeline on the JSONL files (beam_pipeline.run, --input), DirectRunner in
          multi_processing mode with 2 workers, token stores tokenised in parallel ranges; one run per
          vocabulary.
  tokenize  (--modes=tokenize) the tokenisation alone, on one in-process preparation: the sequential
          `prepare.tokenize` against `beam_pipeline.tokenize` (ranges of 16 MB, 2 workers), checking
          that both wrote the same bytes.
Each row carries the 1-minute load average sampled every 10 s during it (the host is shared), the peak
RSS of the process and (Beam) of its largest worker process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_WORDS = 30_000


def _words(rng: np.random.Generator) -> np.ndarray:
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    p = 1.0 / np.arange(1, 27) ** 0.9
    lens = np.clip(rng.poisson(4.5, N_WORDS), 1, 14)
    return np.array(["".join(rng.choice(letters, n, p=p / p.sum())) for n in lens])


def documents(size_mb: int, seed: int = 0):
    """Synthetic documents totalling about `size_mb` MB of UTF-8 text (a generator, same text every run)."""
    rng = np.random.default_rng(seed)
    words = _words(rng)
    cap = np.array([w[0].upper() + w[1:] for w in words])
    end, para = np.char.add(words, "."), np.char.add(words, ".\n\n")
    cdf = np.cumsum(1.0 / np.arange(1, N_WORDS + 1) ** 1.1)
    cdf /= cdf[-1]
    budget = size_mb * 1_000_000
    while budget > 0:
        n = int(np.clip(rng.lognormal(6.0, 0.9), 20, 20_000))  # words; median ~400
        idx = np.searchsorted(cdf, rng.random(n))
        tok = words[idx].astype(object)
        ends = np.cumsum(rng.integers(6, 25, n // 6 + 2))
        ends = ends[ends < n] - 1
        tok[0] = cap[idx[0]]
        starts = ends[ends + 1 < n] + 1
        tok[starts] = cap[idx[starts]]
        tok[ends] = end[idx[ends]]
        breaks = ends[rng.random(len(ends)) < 0.2]
        tok[breaks] = para[idx[breaks]]
        tok[-1] = end[idx[-1]]
        text = " ".join(tok).replace("\n\n ", "\n\n")
        budget -= len(text)
        yield text


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _vocab(kind: str, workdir: str):
    import seqio

    if kind == "byte":
        return seqio.ByteVocabulary()
    from voltron_jax.data import vocab as vocab_lib

    path = os.path.join(workdir, "spm_8000.model")
    if not os.path.exists(path):
        texts = []
        for t in documents(20, seed=1):
            texts.append(t)
        vocab_lib.train_sentencepiece(texts, 8000, path)
    return seqio.SentencePieceVocabulary(path)


def write_child(size_mb: int, kind: str, workdir: str) -> dict:
    from voltron_jax.data import shards

    vocab = _vocab(kind, workdir)
    rss0 = _peak_rss_mb()
    path = os.path.join(workdir, f"{kind}-{size_mb}mb")
    if shards.is_complete(path):
        shards.remove(path)
    gen = [0.0]

    def timed(docs):  # the generator's own time is not the writer's
        while True:
            t = time.perf_counter()
            d = next(docs, None)
            gen[0] += time.perf_counter() - t
            if d is None:
                return
            yield d

    t0 = time.perf_counter()
    index = shards.build_store(path, vocab, lambda w: w.add(timed(documents(size_mb))))
    dt = time.perf_counter() - t0 - gen[0]
    return dict(
        stage="write",
        size_mb=size_mb,
        vocab=kind,
        seconds=dt,
        mb_per_s=size_mb / dt,
        tokens=index["tokens"],
        documents=index["documents"],
        shards=len(index["shards"]),
        generate_seconds=gen[0],
        rss_before_mb=rss0,
        peak_rss_mb=_peak_rss_mb(),
    )


def read_child(size_mb: int, kind: str, workdir: str, seq_len: int, batch: int, batches: int) -> dict:
    import ml_collections

    from configs import tiny
    from voltron_jax.data import pipeline, shards, tasks

    rss0 = _peak_rss_mb()
    path = os.path.join(workdir, f"{kind}-{size_mb}mb")
    store = shards.TokenStore(path)
    name = f"bench_{kind}_{size_mb}"
    tasks.register_store_task(name, {"train": (path, None)})
    c = tiny.get_config("test")
    c.data.vocab = "byte" if kind == "byte" else "sentencepiece"
    c.data.spm_path = "" if kind == "byte" else os.path.join(workdir, "spm_8000.model")
    c.data.seq_len, c.data.batch_size = seq_len, batch
    c.model.vocab_size = max(c.model.vocab_size, store.index["vocab_size"])
    c = ml_collections.ConfigDict(c)
    mk = lambda: pipeline.make_train_iterator(c, f"{name}:1", seed=0)
    it = mk()
    next(it)  # open, first batch
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    tps = batches * batch * seq_len / (time.perf_counter() - t0)
    n_rows = it.providers[0].n_rows
    restore = {}
    for frac in (0.01, 0.5, 0.9):
        state = it.get_state()
        rows = int(frac * n_rows) // batch * batch
        state["tasks"][it.names[0]] = dict(epoch=0, offset=rows)
        state["step"] = rows // batch
        t0 = time.perf_counter()
        fresh = mk()
        fresh.set_state(json.loads(json.dumps(state)))
        next(fresh)
        restore[f"{int(frac * 100)}%"] = time.perf_counter() - t0
    return dict(
        stage="read",
        size_mb=size_mb,
        vocab=kind,
        rows=n_rows,
        tokens_per_s=tps,
        restore_s=restore,
        rss_before_mb=rss0,
        peak_rss_mb=_peak_rss_mb(),
    )


def corpus_files(size_mb: int, workdir: str) -> str:
    """The synthetic corpus as JSONL records in ~64 MB files (written once); returns their glob."""
    final = os.path.join(workdir, f"corpus-{size_mb}mb")
    if not os.path.exists(os.path.join(final, "DONE")):
        folder = f"{final}.partial-{os.getpid()}"  # renamed into place when whole (runs may overlap)
        os.makedirs(folder, exist_ok=True)
        part, f, written = 0, None, 0
        for i, text in enumerate(documents(size_mb)):
            if f is None or written > 64_000_000:
                if f is not None:
                    f.close()
                f, written, part = open(os.path.join(folder, f"part-{part:05d}.jsonl"), "w"), 0, part + 1
            split = "validation" if i % 100 == 7 else "train"
            line = json.dumps(dict(index=i, id=f"syn-{i:08d}", text=text, split=split)) + "\n"
            f.write(line)
            written += len(line)
        f.close()
        open(os.path.join(folder, "DONE"), "w").close()
        try:
            os.rename(folder, final)
        except OSError:  # another run wrote it first: the same bytes
            shutil.rmtree(folder)
    return os.path.join(final, "*.jsonl")


class _Load:
    """1-minute load average sampled every 10 s in a thread (the host is shared: say how loaded)."""

    def __init__(self):
        import threading

        self.samples = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self):
        while not self._stop.wait(10):
            self.samples.append(os.getloadavg()[0])

    def done(self) -> dict:
        self._stop.set()
        self.samples.append(os.getloadavg()[0])
        return dict(load_mean=float(np.mean(self.samples)), load_max=float(np.max(self.samples)))


def _prep_config(kind: str):
    from configs import tiny
    from voltron_jax.config import validate

    c = tiny.get_config("")
    c.data.ordering, c.data.corpus = "icp", "tfds:synthetic"  # not the embedded corpus: SPM is trained
    c.data.vocab, c.data.spm_vocab_size = kind, 8000
    return validate(c)


BEAM_ARGS = ["--runner=DirectRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"]


def _folder_bytes(folder: str) -> dict[str, bytes]:
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))}


def prepare_child(size_mb: int, kinds: list[str], mode: str, workdir: str):
    """Yields each row as soon as it is measured (a long run keeps the rows it finished)."""
    import glob

    from voltron_jax.data import prepare

    pattern = corpus_files(size_mb, workdir)
    run = os.path.join(workdir, f"prep-{mode}-{'+'.join(kinds)}-{size_mb}mb")
    if os.path.exists(run):
        shutil.rmtree(run)
    common = dict(stage="prepare", mode=mode, size_mb=size_mb)
    load = _Load()
    if mode == "inproc":
        t0 = time.perf_counter()
        recs = [json.loads(line) for f in sorted(glob.glob(pattern)) for line in open(f)]
        t_load = time.perf_counter() - t0
        stats = prepare.prepare(_prep_config(kinds[0]), run, records=recs, progress=False, register=False)
        del recs
        total = time.perf_counter() - t0
        stages = sum(v for k, v in stats["seconds"].items() if not isinstance(v, dict))
        row = dict(common, vocab=kinds[0], seconds=total, load_seconds=t_load, stage_seconds=stages)
        row.update(tokenize_seconds=total - t_load - stages, kept=stats["docs"]["kept"])
        yield dict(row, peak_rss_mb=_peak_rss_mb(), **load.done())
        for kind in kinds[1:]:  # the same prepared documents, another vocabulary's stores
            load, t1 = _Load(), time.perf_counter()
            prepare.tokenize(_prep_config(kind).data, os.path.join(run, "data"))
            tok = time.perf_counter() - t1
            row = dict(common, vocab=kind, seconds=t_load + stages + tok, load_seconds=t_load)
            row.update(stage_seconds=stages, tokenize_seconds=tok, kept=stats["docs"]["kept"])
            yield dict(row, peak_rss_mb=_peak_rss_mb(), **load.done())
    elif mode == "tokenize":  # the tokenisation alone: sequential in process vs Beam ranges, same bytes
        from voltron_jax.data import beam_pipeline

        recs = [json.loads(line) for f in sorted(glob.glob(pattern)) for line in open(f)]
        prepare.prepare(_prep_config("byte"), run, records=recs, progress=False, register=False)
        del recs
        for kind in kinds:
            cfg = _prep_config(kind)
            prepare.prepared_vocab(cfg.data, os.path.join(run, "data"))  # SentencePiece trained once, here
            cfg.data.token_dir = os.path.join(run, "seq")
            load, t0 = _Load(), time.perf_counter()
            seq = prepare.tokenize(cfg.data, os.path.join(run, "data"))
            t_seq, l_seq = time.perf_counter() - t0, load.done()
            cfg.data.token_dir = os.path.join(run, "beam")
            load, t0 = _Load(), time.perf_counter()
            par = beam_pipeline.tokenize(cfg, run, beam_args=BEAM_ARGS, range_bytes=16 << 20)
            t_par, l_par = time.perf_counter() - t0, load.done()
            same = all(_folder_bytes(seq[st]) == _folder_bytes(par[st]) for st in seq)
            tokens = sum(json.load(open(os.path.join(p, "index.json")))["tokens"] for p in seq.values())
            row = dict(common, vocab=kind, sequential_s=t_seq, beam_2_workers_s=t_par, identical=same)
            yield dict(row, tokens=tokens, load_sequential=l_seq, load_beam=l_par, range_mb=16)
    else:
        from voltron_jax.data import beam_pipeline

        (kind,) = kinds
        args = BEAM_ARGS
        t0 = time.perf_counter()
        stats = beam_pipeline.run(_prep_config(kind), run, input_pattern=pattern, beam_args=args)
        total = time.perf_counter() - t0
        worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        row = dict(common, vocab=kind, seconds=total, kept=stats["docs"]["kept"], worker_peak_rss_mb=worker)
        yield dict(row, peak_rss_mb=_peak_rss_mb(), **load.done())
    shutil.rmtree(run)


def _run(args: list[str]) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    out = subprocess.run(
        [sys.executable, __file__, *args], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _run_rows(args: list[str]):
    """A child that prints one JSON row per line: each row is yielded as the child prints it."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    with subprocess.Popen(
        [sys.executable, __file__, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    ) as child:
        for line in child.stdout:
            if line.startswith('{"stage"'):
                yield json.loads(line)
    if child.returncode:
        raise SystemExit(f"benchmark child {args} failed (exit {child.returncode}); its stderr is above")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes_mb", default="200,1000")
    ap.add_argument("--vocabs", default="byte,sentencepiece")
    ap.add_argument("--workdir", default="/tmp/voltron_data_bench")
    ap.add_argument("--seq_len", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--json", default="")
    ap.add_argument("--stages", default="write,read")
    ap.add_argument("--modes", default="inproc,beam")  # stage prepare: in-process and/or Beam
    ap.add_argument("--child", default="")  # internal: write|read,size,vocab or prepare,size,vocab,mode
    a = ap.parse_args()
    if a.child:
        stage, size, kind, *mode = a.child.split(",")
        if stage == "prepare":
            for row in prepare_child(int(size), kind.split("+"), mode[0], a.workdir):
                print(json.dumps(row), flush=True)
            return
        if stage == "write":
            res = write_child(int(size), kind, a.workdir)
        else:
            res = read_child(int(size), kind, a.workdir, a.seq_len, a.batch, a.batches)
        print(json.dumps(res))
        return
    os.makedirs(a.workdir, exist_ok=True)
    if a.stages == "prepare":
        for size in (int(s) for s in a.sizes_mb.split(",")):
            for mode in a.modes.split(","):
                # in process: one run gives every vocabulary's row; Beam: one pipeline per vocabulary
                one = mode in ("inproc", "tokenize")
                groups = [a.vocabs.replace(",", "+")] if one else a.vocabs.split(",")
                for kinds in groups:
                    for res in _run_rows(
                        [f"--child=prepare,{size},{kinds},{mode}", f"--workdir={a.workdir}"]
                    ):
                        print(json.dumps(res), flush=True)
                        if a.json:
                            with open(a.json, "a") as f:
                                f.write(json.dumps(res) + "\n")
        return
    for kind in a.vocabs.split(","):
        for size in (int(s) for s in a.sizes_mb.split(",")):
            common = [f"--workdir={a.workdir}", f"--seq_len={a.seq_len}", f"--batch={a.batch}"]
            for stage in a.stages.split(","):
                res = _run([f"--child={stage},{size},{kind}", *common, f"--batches={a.batches}"])
                print(json.dumps(res), flush=True)
                if a.json:
                    with open(a.json, "a") as f:
                        f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
