"""The one table of data orderings (`data.ordering`): what each means and what the preparation writes.

Every module that asks "which ordering is this" reads `ORDERINGS` (config validation, the task that the
mixture name 'corpus' means, which token stores prepare writes, whether the train loop must prepare):
adding an ordering is one entry here plus the store it names in prepare.py.

Token stores (ArrayRecord shards under <workdir>/data/tokens/<vocab>/, voltron_jax/data/shards.py):
  'icp'              the kept train documents, cluster after cluster, each cluster in ICP order
  'random'           the same documents in one seeded random order (sorted by a hash of seed and index)
  'cluster_shuffled' the same documents cluster after cluster, each cluster in a seeded random order
Validation stores ('validation' in corpus order, 'validation_clusters' cluster after cluster) are
written for every ordering.
"""

from __future__ import annotations

import dataclasses

from voltron_jax.data.corpus import DataError


@dataclasses.dataclass(frozen=True)
class Ordering:
    """What `data.ordering=<name>` means."""

    name: str
    needs_prepare: bool  # the stable/decay mixtures read <workdir>/data (else only cluster phases do)
    corpus_task: str | None  # the task the mixture name 'corpus' means (None: data.corpus itself)
    corpus_store: str | None  # the train token store behind corpus_task
    cluster_store: str  # the train token store whose per-cluster segments the branch phases read
    doc: str


ORDERINGS: dict[str, Ordering] = {
    o.name: o
    for o in (
        Ordering(
            "random",
            needs_prepare=False,
            corpus_task=None,
            corpus_store=None,
            cluster_store="cluster_shuffled",
            doc="documents in corpus order, contexts shuffled (no preparation unless a phase reads clusters)",
        ),
        Ordering(
            "icp",
            needs_prepare=True,
            corpus_task="icp",
            corpus_store="icp",
            cluster_store="icp",
            doc="deduplicated documents in In-Context Pretraining order within each c-BTM cluster",
        ),
        Ordering(
            "dedup_random",
            needs_prepare=True,
            corpus_task="icp_random",
            corpus_store="random",
            cluster_store="cluster_shuffled",
            doc="the same deduplicated documents in a seeded random order (the ICP ablation's baseline)",
        ),
    )
}


def get(name: str) -> Ordering:
    """The ordering named `name`; KeyError-free: unknown names raise a DataError listing the known ones."""
    if name not in ORDERINGS:
        raise DataError(f"data.ordering={name!r} is not one of {sorted(ORDERINGS)}.")
    return ORDERINGS[name]


def train_stores(name: str) -> tuple[str, ...]:
    """The train token stores that prepare writes for ordering `name` (its corpus, its clusters)."""
    o = get(name)
    return tuple(dict.fromkeys(s for s in (o.corpus_store, o.cluster_store) if s))
