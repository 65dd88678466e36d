"""Embedded corpus: file rules, deterministic disjoint splits, pydoc held out, paragraphs, manifest."""

import hashlib
import json
import pathlib

import pytest

from configs import tiny
from voltron_jax.data import corpus


def test_stdlib_files_follow_the_rules():
    files = corpus.stdlib_files()
    paths = [p for p, _ in files]
    assert len(files) > 300 and paths == sorted(paths)
    for path, data in files:
        parts = pathlib.PurePosixPath(path).parts
        assert path.endswith(corpus.SUFFIXES)
        assert not {"site-packages", "test", "tests", "pydoc_data"} & set(parts[:-1]), path
        data.decode("utf-8")  # only valid UTF-8 is kept
    root = corpus.stdlib_root()
    assert (root / "json" / "decoder.py").read_bytes() == dict(files)["json/decoder.py"]


def test_split_is_deterministic_disjoint_and_complete():
    a, b = corpus.stdlib_source("file", 0.05), corpus.stdlib_source("file", 0.05)
    train, val = [d.id for d in a.documents("train")], [d.id for d in a.documents("validation")]
    assert train == [d.id for d in b.documents("train")] and val == [d.id for d in b.documents("validation")]
    assert not set(train) & set(val)
    nonempty = {p for p, data in corpus.stdlib_files() if data}
    assert set(train) | set(val) == nonempty
    assert 0.02 < len(val) / len(nonempty) < 0.09  # hash split near val_fraction
    # The split depends on the path only: a larger fraction keeps every earlier validation file.
    assert set(val) <= {d.id for d in corpus.stdlib_source("file", 0.2).documents("validation")}


def test_paragraph_granularity_keeps_each_file_in_its_split():
    files = corpus.stdlib_source("file", 0.05)
    paras = corpus.stdlib_source("paragraph", 0.05)
    for split in corpus.SPLITS:
        file_ids = {d.id for d in files.documents(split)}
        assert {d.id.split("#")[0] for d in paras.documents(split)} <= file_ids
    n = sum(len(paras.documents(s)) for s in corpus.SPLITS)
    assert n > 20 * sum(len(files.documents(s)) for s in corpus.SPLITS)  # ~36k paragraphs from ~740 files


def test_paragraphs_split_on_blank_lines_and_merge_tiny_pieces():
    text = "a = 1\n\n\nimport os\n  \nclass Foo:\n    x = 1\n" + "\n\n" + "y" * 100
    got = corpus.paragraphs(text, min_chars=20)
    assert got == ["a = 1\n\nimport os\n\nclass Foo:\n    x = 1", "y" * 100]
    assert corpus.paragraphs("tiny", min_chars=20) == ["tiny"]  # a short tail is kept


def test_pydoc_is_held_out_of_stdlib_and_is_its_own_corpus():
    stdlib = corpus.stdlib_source("file", 0.02)
    ids = [d.id for s in corpus.SPLITS for d in stdlib.documents(s)]
    assert not any("pydoc_data" in i for i in ids)
    pydoc = corpus.pydoc_source("file", 0.02)
    topics = corpus.pydoc_topics()
    docs = [d for s in corpus.SPLITS for d in pydoc.documents(s)]
    assert {d.id for d in docs} == {f"pydoc:{k}" for k in topics}
    assert pydoc.documents("validation"), "a tiny corpus still gets one validation document"
    assert docs[0].text == topics[docs[0].id[len("pydoc:") :]]


def test_document_source_ids_empty_docs_and_fingerprint():
    src = corpus.DocumentSource({"train": ["x", "", "y"], "validation": [corpus.Document("v", "z")]})
    assert [d.id for d in src.documents("train")] == ["train/0", "train/2"]
    reordered = corpus.DocumentSource(
        {"train": [corpus.Document("train/2", "y"), corpus.Document("train/0", "x")]}
    )
    assert src.fingerprint("train") != reordered.fingerprint("train")
    with pytest.raises(corpus.DataError, match="duplicate document ids"):
        corpus.DocumentSource({"train": [corpus.Document("a", "x"), corpus.Document("a", "y")]})
    with pytest.raises(corpus.DataError, match="split 'test' does not exist"):
        src.documents("test")


def test_manifest_is_written_with_hashes_and_splits(tmp_path):
    cfg = tiny.get_config("test")
    path = corpus.write_manifest(str(tmp_path / "run"), cfg.data)
    m = json.loads(pathlib.Path(path).read_text())
    files = {f["path"]: f for f in m["stdlib"]["files"]}
    data = dict(corpus.stdlib_files())["json/decoder.py"]
    assert files["json/decoder.py"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert files["json/decoder.py"]["bytes"] == len(data)
    val = {d.id for d in corpus.stdlib_source("file", cfg.data.val_fraction).documents("validation")}
    assert {p for p, f in files.items() if f["split"] == "validation"} == val
    assert m["pydoc"]["topics"] == len(corpus.pydoc_topics()) and m["mixtures"]["decay"]


def test_to_jsonl_numbers_raw_records_and_splits_by_id(tmp_path):
    import gzip

    from voltron_jax.data import to_jsonl

    raw = tmp_path / "raw"
    raw.mkdir()
    for f in range(2):
        with gzip.open(raw / f"c4-train.{f}.json.gz", "wt") as out:
            for i in range(30):
                out.write(json.dumps(dict(text=f"doc {f} {i}" if i != 4 else "", url=f"u/{f}/{i}")) + "\n")
    counts = to_jsonl.convert(
        to_jsonl.raw_records(str(raw / "c4-train.*.json.gz"), 0.2), str(tmp_path / "o"), 25
    )
    recs = [json.loads(x) for p in sorted((tmp_path / "o").iterdir()) for x in p.read_text().splitlines()]
    assert counts["files"] == 3 and [r["index"] for r in recs] == list(range(58))  # empty texts skipped
    assert recs[0] == dict(index=0, id="u/0/0", text="doc 0 0", split=recs[0]["split"])
    assert 0 < counts["validation"] < 25 and counts["train"] + counts["validation"] == 58
    assert {r["split"] for r in recs if r["id"] == "u/1/7"} == {corpus.split_of("u/1/7", 0.2)}
    (raw / "bad.json.gz").write_bytes(gzip.compress(b'{"no_text": 1}\n'))
    with pytest.raises(corpus.DataError, match="bad.json.gz, line 1: not a JSON object with a 'text'"):
        list(to_jsonl.raw_records(str(raw / "*.json.gz"), 0.0))


def _python_docs(root: pathlib.Path) -> pathlib.Path:
    """A fake python3.X-doc _sources tree: long documents in folders, plus files that are not sources."""
    for rel, n in (
        ("tutorial/index.rst.txt", 30),
        ("library/stdtypes.rst.txt", 400),
        ("faq/general.rst.txt", 90),
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("".join(f"Paragraph {i} of {rel}: prose about Python.\n\n" for i in range(n)))
    (root / "library" / "notes.html").write_text("<p>not a source</p>")
    return root


def test_python_docs_is_one_document_per_source_file_split_by_path(tmp_path):
    root = _python_docs(tmp_path / "python3.11" / "html" / "_sources")
    src = corpus.python_docs_source("file", 0.34, root=root)
    docs = {d.id: d.text for s in corpus.SPLITS for d in src.documents(s)}
    assert sorted(docs) == ["faq/general.rst.txt", "library/stdtypes.rst.txt", "tutorial/index.rst.txt"]
    assert docs["library/stdtypes.rst.txt"] == (root / "library/stdtypes.rst.txt").read_text()
    assert src.documents("validation") and src.documents("train")  # split by path, as the stdlib's
    paragraphs = corpus.python_docs_source("paragraph", 0.34, root=root)
    assert sum(len(paragraphs.documents(s)) for s in corpus.SPLITS) > 3


def test_python_docs_missing_names_the_package_to_install(tmp_path, monkeypatch):
    with pytest.raises(corpus.DataError, match="apt-get install python3.11-doc"):
        corpus.python_docs_source(root=tmp_path)  # no *.rst.txt there
    monkeypatch.setattr(corpus, "PYTHON_DOCS_GLOB", str(tmp_path / "none" / "python3*" / "html" / "_sources"))
    assert corpus.python_docs_root() is None
    with pytest.raises(corpus.DataError, match="python_docs"):
        corpus.embedded_source("python_docs")
    with pytest.raises(corpus.DataError, match="not an embedded corpus"):
        corpus.embedded_source("c4")


def test_python_docs_root_is_the_newest_installed_version(tmp_path, monkeypatch):
    for v in ("python3.9", "python3.11", "python3.10"):
        (tmp_path / v / "html" / "_sources").mkdir(parents=True)
    _python_docs(tmp_path / "python3.11" / "html" / "_sources")
    monkeypatch.setattr(corpus, "PYTHON_DOCS_GLOB", str(tmp_path / "python3*" / "html" / "_sources"))
    assert corpus.python_docs_root() == tmp_path / "python3.11" / "html" / "_sources"
    assert len(corpus.embedded_source("python_docs").documents("train")) >= 1


def test_config_accepts_python_docs_and_names_it_for_a_bad_corpus():
    from voltron_jax import config as cfglib
    from voltron_jax.errors import ConfigError

    c = tiny.get_config("test")
    c.data.corpus = "python_docs"
    cfglib.validate(c)
    c.data.corpus = "books"
    with pytest.raises(ConfigError, match="'python_docs'"):
        cfglib.validate(c)
