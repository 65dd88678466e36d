"""Embedded corpora that need no download, and the document-source abstraction every task builds on.

Two corpora ship with any Python interpreter:

* **stdlib** (the pretraining corpus): the running interpreter's standard library sources
  (`sysconfig.get_paths()['stdlib']`): `.py` (and `.txt`/`.rst`) files read as bytes in sorted path order,
  skipping `site-packages`, test folders (`test`, `tests`, `idle_test`), `pydoc_data`, `__pycache__`
  and files that are not valid UTF-8.
* **pydoc** (the high-quality set of the decay stage): the reference documentation in
  `pydoc_data/topics.py`, one document per topic. It is held out of the stdlib corpus.

One more installs with the system's package tool (`data.corpus='python_docs'`):

* **python_docs**: a long-document, natural-language corpus, the reStructuredText sources of the Python
  documentation (tutorial, library and language reference, HOWTOs, FAQs, what's new) that Debian's
  `python3.X-doc` package installs under `/usr/share/doc/python3.X/html/_sources` (`apt-get install
  python3.11-doc` on Debian 12, a 12.6 MB download: 497 documents, 10.9 MB of text, median 10 KB, 280 over 8
  KB, the longest 212 KB), one document per file. Unlike 256-byte rows of stdlib files, these documents run
  far past a context of a few thousand bytes, so a compressive memory (Infini-attention) or a document order
  (ICP) has something to carry. Its reference chapters overlap the pydoc topics (pydoc_data is generated from
  them), so do not decay on pydoc while pretraining on it and call the decay set held out.

Both are split into train/validation by a hash of the file path (or topic name), so the split does not
depend on the Python version or on which other files exist; paragraph pieces of one file stay in that
file's split. Granularity 'file' gives one document per file; 'paragraph' splits files on blank lines
and merges pieces shorter than `PARAGRAPH_MIN_CHARS` into the next one (about 36k documents for
CPython 3.11; blank lines are the only split point that keeps code units intact).

`DocumentSource` holds explicit ordered documents per split; ICP ordering and c-BTM clusters build
theirs from reordered/filtered `Document` lists. This module has no TensorFlow/seqio imports.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import re
import sys
import sysconfig
from collections.abc import Mapping, Sequence

from etils import epath  # light; handles gs:// and local paths alike

from voltron_jax.errors import VoltronError

SPLITS = ("train", "validation")
EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "pydoc_data", "__pycache__"}
)
SUFFIXES = (".py", ".txt", ".rst")
PARAGRAPH_MIN_CHARS = 64
_BLANK_LINE = re.compile(r"\n(?:[ \t]*\n)+")


class DataError(VoltronError, ValueError):
    """Data that cannot be served; the message names the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class Document:
    """One document: a stable id (e.g. 'json/decoder.py' or 'json/decoder.py#3') and its text."""

    id: str
    text: str


class DocumentSource:
    """Explicit ordered documents per split (the order is the order the packed stream follows).

    Build one from any list: `DocumentSource({'train': docs, 'validation': val_docs})`, where the items are
    `Document`s or plain strings (which get ids '<split>/<index>'). Empty documents are dropped (they
    would pack to a lone EOS). Ids must be unique within a split.
    """

    def __init__(self, splits: Mapping[str, Sequence[Document | str]]):
        self._docs: dict[str, list[Document]] = {}
        for split, items in splits.items():
            docs = [
                d if isinstance(d, Document) else Document(f"{split}/{i}", d) for i, d in enumerate(items)
            ]
            bad = [d for d in docs if not isinstance(d.text, str)]
            if bad:
                raise DataError(
                    f"document {bad[0].id!r} of split {split!r} is {type(bad[0].text).__name__}, "
                    "not str; decode bytes as UTF-8 first."
                )
            docs = [d for d in docs if d.text]
            if len({d.id for d in docs}) != len(docs):
                raise DataError(
                    f"split {split!r} has duplicate document ids; give every document a unique id."
                )
            self._docs[split] = docs
        self._fingerprints: dict[str, str] = {}

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self._docs)

    def documents(self, split: str) -> list[Document]:
        """The ordered documents of `split` (raises DataError if the split is unknown)."""
        if split not in self._docs:
            raise DataError(f"split {split!r} does not exist; this source has {list(self._docs)}.")
        return self._docs[split]

    def fingerprint(self, split: str) -> str:
        """sha256 over ids and texts in order: the cache key of the tokenised stream of `split`."""
        if split not in self._fingerprints:
            h = hashlib.sha256()
            for d in self.documents(split):
                for part in (d.id, d.text):
                    b = part.encode("utf-8")
                    h.update(len(b).to_bytes(8, "little"))
                    h.update(b)
            self._fingerprints[split] = h.hexdigest()
        return self._fingerprints[split]


# --------------------------------------------------------------------------------------------- stdlib files


def stdlib_root() -> pathlib.Path:
    """The running interpreter's standard library folder."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=4)
def stdlib_files(root: str | None = None) -> tuple[tuple[str, bytes], ...]:
    """(relative posix path, bytes) of every included file under `root`, in sorted path order."""
    base = pathlib.Path(root) if root else stdlib_root()
    paths = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]  # prune: site-packages can be huge
        rel_dir = pathlib.Path(dirpath).relative_to(base)
        paths += [(rel_dir / f).as_posix() for f in filenames if f.endswith(SUFFIXES)]
    out = []
    for rel in sorted(paths):
        data = (base / rel).read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        out.append((rel, data))
    return tuple(out)


def split_of(key: str, val_fraction: float) -> str:
    """'validation' for a deterministic `val_fraction` of keys (by sha256 of the key), else 'train'."""
    u = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64
    return "validation" if u < val_fraction else "train"


def paragraphs(text: str, min_chars: int = PARAGRAPH_MIN_CHARS) -> list[str]:
    """Blank-line separated pieces of `text`; a piece shorter than `min_chars` is merged into the next."""
    out, cur = [], ""
    for piece in _BLANK_LINE.split(text):
        cur = f"{cur}\n\n{piece}" if cur else piece
        if len(cur) >= min_chars:
            out.append(cur)
            cur = ""
    if cur.strip():
        out.append(cur)
    return out


def _split_documents(
    items: Sequence[tuple[str, str]], granularity: str, val_fraction: float
) -> DocumentSource:
    """(key, text) items -> DocumentSource, split by key hash, optionally cut into paragraphs."""
    if granularity not in ("file", "paragraph"):
        raise DataError(f"data.granularity={granularity!r}; use 'file' or 'paragraph'.")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"data.val_fraction={val_fraction} must be in [0, 1).")
    by_split = {s: [] for s in SPLITS}
    keys = [k for k, _ in items]
    val_keys = {k for k in keys if split_of(k, val_fraction) == "validation"}
    if val_fraction > 0 and not val_keys and len(keys) > 1:
        # A tiny corpus still gets a validation set: the key with the smallest hash.
        val_keys = {min(keys, key=lambda k: hashlib.sha256(k.encode("utf-8")).digest())}
    for key, text in items:
        split = "validation" if key in val_keys else "train"
        if granularity == "file":
            by_split[split].append(Document(key, text))
        else:
            by_split[split].extend(Document(f"{key}#{i}", p) for i, p in enumerate(paragraphs(text)))
    return DocumentSource(by_split)


def stdlib_source(
    granularity: str = "file", val_fraction: float = 0.02, root: str | None = None
) -> DocumentSource:
    """The embedded pretraining corpus (standard library sources, pydoc_data excluded)."""
    files = stdlib_files(root)
    if not files:
        raise DataError(
            f"no {'/'.join(SUFFIXES)} files found under {root or stdlib_root()}; the embedded "
            "corpus needs a CPython standard library (or set data.corpus='tfds:<name>')."
        )
    return _split_documents([(p, b.decode("utf-8")) for p, b in files], granularity, val_fraction)


def pydoc_topics() -> dict[str, str]:
    """The reference-documentation topics of `pydoc_data/topics.py` (topic -> text), sorted by topic."""
    try:
        from pydoc_data.topics import topics  # lazy: some interpreters lack pydoc_data (the error below)
    except ImportError as e:
        raise DataError(
            "pydoc_data.topics is missing from this interpreter; drop 'pydoc' from "
            "data.mixtures or use a full CPython install."
        ) from e
    return dict(sorted(topics.items()))


def pydoc_source(granularity: str = "file", val_fraction: float = 0.02) -> DocumentSource:
    """The high-quality decay-stage corpus: one document per pydoc topic (ids 'pydoc:<topic>')."""
    return _split_documents([(f"pydoc:{k}", v) for k, v in pydoc_topics().items()], granularity, val_fraction)


PYTHON_DOCS_GLOB = "/usr/share/doc/python3*/html/_sources"  # Debian's python3.X-doc


def python_docs_root() -> pathlib.Path | None:
    """The newest installed Python documentation sources (python3.X-doc), or None."""
    found = sorted(pathlib.Path("/").glob(PYTHON_DOCS_GLOB.lstrip("/")), key=lambda p: _version_key(p))
    return found[-1] if found else None


def _version_key(p: pathlib.Path) -> tuple[int, ...]:
    digits = re.findall(r"\d+", p.parent.parent.name)  # python3.11 -> (3, 11)
    return tuple(int(x) for x in digits)


def python_docs_source(
    granularity: str = "file", val_fraction: float = 0.02, root: str | os.PathLike | None = None
) -> DocumentSource:
    """The Python documentation's reStructuredText sources (module docstring), one document per
    `*.rst.txt` file (id: its path under `root`, e.g. 'library/stdtypes.rst.txt'), in sorted path order."""
    base = pathlib.Path(root) if root is not None else python_docs_root()
    files = sorted(base.rglob("*.rst.txt")) if base is not None and base.is_dir() else []
    if not files:
        raise DataError(
            f"data.corpus='python_docs': no *.rst.txt under {base or PYTHON_DOCS_GLOB}; install the Python "
            "documentation with the system's package tool (Debian/Ubuntu: `apt-get install python3.11-doc`) "
            "or use data.corpus='stdlib'."
        )
    items = [(f.relative_to(base).as_posix(), f.read_text(encoding="utf-8", errors="replace")) for f in files]
    return _split_documents(items, granularity, val_fraction)


EMBEDDED = ("stdlib", "python_docs")  # corpora read in process (no TFDS, no Beam input)


def embedded_source(name: str, granularity: str = "file", val_fraction: float = 0.02) -> DocumentSource:
    """The DocumentSource of embedded corpus `name` (one of EMBEDDED)."""
    if name == "python_docs":
        return python_docs_source(granularity, val_fraction)
    if name == "stdlib":
        return stdlib_source(granularity, val_fraction)
    raise DataError(f"{name!r} is not an embedded corpus; use one of {EMBEDDED}.")


# --------------------------------------------------------------------------------------------- manifest


def manifest(data_cfg=None) -> dict:
    """What the embedded corpus is made of: every file (path, sha256, bytes, split) and the pydoc topics.

    `data_cfg` (config.data) sets the split and granularity recorded; None uses file/0.02. For a TFDS
    corpus the manifest names the dataset and data_dir instead of listing files.
    """
    granularity = data_cfg.granularity if data_cfg is not None else "file"
    val_fraction = float(data_cfg.val_fraction) if data_cfg is not None else 0.02
    out = {"python": sys.version.split()[0], "granularity": granularity, "val_fraction": val_fraction}
    if data_cfg is not None:
        out.update(
            corpus=data_cfg.corpus,
            vocab=data_cfg.vocab,
            spm_path=data_cfg.spm_path,
            tfds_data_dir=data_cfg.tfds_data_dir,
            mixtures={k: data_cfg.mixtures[k] for k in data_cfg.mixtures},
        )
    files = stdlib_files()
    src = _split_documents([(p, "x") for p, _ in files], "file", val_fraction) if files else None
    val = {d.id for d in src.documents("validation")} if src else set()
    out["stdlib"] = {
        "root": str(stdlib_root()),
        "files": [
            {
                "path": p,
                "sha256": hashlib.sha256(b).hexdigest(),
                "bytes": len(b),
                "split": "validation" if p in val else "train",
            }
            for p, b in files
        ],
        "total_bytes": sum(len(b) for _, b in files),
    }
    try:
        topics = pydoc_topics()
    except DataError:
        topics = {}
    blob = json.dumps(topics, sort_keys=True).encode("utf-8")
    out["pydoc"] = {
        "topics": len(topics),
        "sha256": hashlib.sha256(blob).hexdigest(),
        "bytes": sum(len(v.encode("utf-8")) for v in topics.values()),
    }
    return out


def write_manifest(workdir: str, data_cfg=None) -> str:
    """Write `manifest(data_cfg)` to `<workdir>/corpus_manifest.json` (local path or bucket URL)."""

    path = epath.Path(workdir) / "corpus_manifest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest(data_cfg), indent=1))
    return str(path)
