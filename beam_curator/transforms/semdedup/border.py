"""Stage 7 (with --border_margin only): a point placed in two clusters gets one answer.

Its two memberships' rows meet by id; the merged row (a duplicate if either membership says
so) goes back to the file of its home cluster (or block), where the decisions are written.

    (file, Decisions) -> (id, Membership) -> GroupByKey(id) -> merged
                      -> (home file, Membership) -> GroupByKey(file) -> (file, Decisions)
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import apache_beam as beam
import numpy as np

from beam_curator.dedup import blocks
from beam_curator.transforms.semdedup.records import (
    Decisions,
    Members,
    ReferenceMatches,
    cluster_file,
)


class Membership(NamedTuple):
    """One member's answer in one of the clusters it joined."""

    cluster: int
    border: bool          # a second membership (not its home cluster)
    id: str
    cos_dist: float       # to the home centroid
    l2_dist: float
    max_id: str
    sim: float
    duplicate: bool
    reference_id: Optional[str] = None     # with --reference: the best reference row met
    reference_sim: float = float("-inf")
    reference_duplicate: bool = False


def merge_memberships(rows) -> Membership:
    """A border point's memberships -> one: a duplicate if either membership says so (and a
    reference duplicate if either met its reference row)."""
    rows = sorted(rows, key=lambda r: (r.border, r.cluster))   # the home membership first
    home, dups = rows[0], [r for r in rows if r.duplicate]
    best = max(dups or rows, key=lambda r: r.sim)
    # the best reference row: highest similarity, ties to the smallest reference id
    top = max(r.reference_sim for r in rows)
    ref = min((r for r in rows if r.reference_sim == top), key=lambda r: r.reference_id or "")
    return home._replace(max_id=best.max_id, sim=best.sim, duplicate=bool(dups),
                         reference_id=ref.reference_id, reference_sim=ref.reference_sim,
                         reference_duplicate=any(r.reference_duplicate for r in rows))


def _memberships(element):
    _, decisions = element
    m, ref = decisions.members, decisions.reference
    for k, (id_, max_id, sim, dup) in enumerate(decisions.rows()):
        extra = () if ref is None else (ref.ids[k], float(ref.sim[k]),
                                         bool(decisions.is_reference_duplicate[k]))
        yield id_, Membership(decisions.cluster, bool(m.border[k]), id_, float(m.cos_dist[k]),
                              float(m.l2_dist[k]), max_id, sim, dup, *extra)


def _home_file(row: Membership, sizes: dict, block_rows: int) -> tuple:
    nb = blocks.n_blocks(sizes[row.cluster], block_rows)
    block = int(blocks.block_of([row.id], nb, row.cluster)[0])
    return cluster_file(row.cluster, nb, block), row


def _decisions_from_memberships(element):
    key, rows = element
    rows = sorted(rows, key=lambda r: r.id)
    members = Members(ids=tuple(r.id for r in rows),
                      cos_dist=np.array([r.cos_dist for r in rows], np.float32),
                      l2_dist=np.array([r.l2_dist for r in rows], np.float32),
                      border=np.zeros(len(rows), bool))
    reference = ref_dup = None
    if rows[0].reference_id is not None:
        reference = ReferenceMatches(np.array([r.reference_sim for r in rows], np.float32),
                                     np.array([r.reference_id for r in rows], dtype=object))
        ref_dup = np.array([r.reference_duplicate for r in rows], bool)
    return key, Decisions(
        rows[0].cluster, members, tuple(r.max_id for r in rows),
        np.array([r.sim for r in rows], np.float32), np.array([r.duplicate for r in rows], bool),
        reference, ref_dup)


class OneAnswerPerMember(beam.PTransform):
    """(file, Decisions) with border memberships -> (file, Decisions), one row per member,
    given the cluster sizes (a PCollection of (cluster, n)) and --pairwise_block_size."""

    def __init__(self, sizes: beam.PCollection, block_rows: int):
        super().__init__()
        self._sizes, self._block_rows = sizes, block_rows

    def expand(self, decisions):
        return (decisions
                | "Memberships" >> beam.FlatMap(_memberships)
                | "GroupMemberships" >> beam.GroupByKey()
                | "MergeMemberships" >> beam.MapTuple(lambda _, rows: merge_memberships(rows))
                | "ByHomeFile" >> beam.Map(_home_file, beam.pvalue.AsDict(self._sizes),
                                           self._block_rows)
                | "GroupByHomeFile" >> beam.GroupByKey()
                | "AsDecisions" >> beam.Map(_decisions_from_memberships))
