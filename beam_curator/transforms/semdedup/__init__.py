"""SemDeDup in Beam, one stage per module; `SemanticDedup` strings them together.

    Chunk (a parquet row group or .npy rows of embeddings: a reference, no vectors)
      rows.py       CheckRows      decode once, check; (dedup command) refuse repeated ids
      exact.py      ExactCopies    GroupByKey(content hash): the smallest id survives
      centroids.py  Centroids      count -> plan -> k-means sample -> train | --centroids
      assign.py     Assign         nearest centroid (side input) -> cluster sizes (O(k))
      route.py      Route          bins of small clusters | block pairs -> GroupByKey
      pairwise.py   Pairwise       rank, max cosine to an earlier member, keep rule
      border.py     OneAnswerPerMember   (--border_margin) a point in two clusters
      outputs.py    WriteClusterOutputsFn, discard_scratch_after
    with the records and keys in records.py, the input in sources.py, and where the vectors
    live between the steps in vectors.py (the one owner of dedup/_staging/).

What crosses each shuffle: chunk references and (hash, id) pairs before the centroids; one
`Members` element per chunk x bin (or block pair) at the pairwise GroupByKey, its vectors
inline (shuffle transport) or as (file, row) references (staged): the one time vectors cross
a shuffle; decisions (no vectors) after it. No step holds more than O(k) (centroids, cluster
sizes) or one key's members (at most about 2 x pairwise_block_size) in one process.

The pure algorithms are in `beam_curator.dedup`; the public transforms around this one in
`transforms/dedup.py`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import apache_beam as beam

from beam_curator.transforms.semdedup.assign import Assign, TargetClusters
from beam_curator.transforms.semdedup.border import OneAnswerPerMember
from beam_curator.transforms.semdedup.centroids import Centroids
from beam_curator.transforms.semdedup.config import DedupConfig
from beam_curator.transforms.semdedup.exact import ExactCopies
from beam_curator.transforms.semdedup.info import dedup_info, reference_info, target_info
from beam_curator.transforms.semdedup.outputs import (
    WriteClusterOutputsFn,
    discard_scratch_after,
    write_target_filtered,
)
from beam_curator.transforms.semdedup.pairwise import Pairwise, ReferenceSet
from beam_curator.transforms.semdedup.route import Route
from beam_curator.transforms.semdedup.rows import CheckRows
from beam_curator.transforms.semdedup.vectors import ShuffledVectors, mark_staging, vector_store

__all__ = ["SemanticDedup", "SemanticDedupOutputs", "DedupConfig"]


class SemanticDedupOutputs(NamedTuple):
    decisions: beam.PCollection  # Decisions per cluster (or block); exact copies not in them
    exact: beam.PCollection      # ExactDuplicate
    written: beam.PCollection    # one element: dedup/ is written and the scratch files gone
    info: beam.PCollection       # one dict: the plan, the cluster sizes, the input checks
    invalid: beam.PCollection    # InvalidRow: rows left out (no answer in `decisions`)
    filtered: beam.PCollection   # (chunk name, ids, home clusters) outside --target


class SemanticDedup(beam.PTransform):
    """Chunks of embeddings -> SemanticDedupOutputs, writing OUTPUT/dedup/.

    `has_hash`: the chunks carry a content_hash column (the exact pre-pass runs);
    `check_ids`: refuse an id read twice (see rows.CheckRows); `references`, `targets`:
    chunks of --reference and --target rows (role REFERENCE / TARGET), or None;
    `reference_set`: with --reference_exact, the reference loaded whole on each worker (its
    chunks are then not routed)."""

    def __init__(self, config: DedupConfig, has_hash: bool, check_ids: bool = False,
                 references=None, targets=None, reference_set: Optional[ReferenceSet] = None):
        super().__init__()
        self._config, self._has_hash, self._check_ids = config, has_hash, check_ids
        self._references, self._targets = references, targets
        self._reference_set = reference_set

    def expand(self, chunks):
        config = mark_staging(self._config)   # the launcher's marker: see vectors.py
        store = vector_store(config)
        rows = chunks | "CheckRows" >> CheckRows(config, store, self._check_ids)
        exact = rows.chunks | "ExactCopies" >> ExactCopies(config, self._has_hash)
        centroids = exact.chunks | "Centroids" >> Centroids(config, store)
        to_assign, others = exact.chunks, {}
        if self._references is not None:
            # --reference_exact reads the reference itself (ReferenceSet): nothing to stage
            checked_in = store if self._reference_set is None else ShuffledVectors(config)
            references = self._references | "CheckReferenceRows" >> CheckRows(
                config, checked_in, check_ids=False)
            if self._reference_set is None:   # compared inside the clusters they fall in
                to_assign = ((exact.chunks, references.chunks)
                             | "CandidatesAndReferences" >> beam.Flatten())
        target_clusters = None
        if self._targets is not None:
            targets = self._targets | "CheckTargetRows" >> CheckRows(config, store, False)
            target_clusters = targets.chunks | "TargetClusters" >> TargetClusters(
                config, store, centroids.centroids)
        assigned = to_assign | "Assign" >> Assign(config, store, centroids.centroids)
        routed = assigned.assigned | "Route" >> Route(config, store, assigned.sizes,
                                                      target_clusters)
        decisions = routed.groups | "Pairwise" >> Pairwise(
            config, store, self._references is not None, self._reference_set)
        if config.border_margin is not None:
            decisions = decisions | "OneAnswerPerMember" >> OneAnswerPerMember(
                assigned.sizes, config.pairwise_block_size)
        written = decisions | "WriteClusterOutputs" >> beam.ParDo(
            WriteClusterOutputsFn(config.dedup_dir))
        all_written = [centroids.written, written, exact.written]
        if self._targets is not None:
            all_written.append(routed.filtered | "WriteTargetFiltered" >> beam.FlatMap(
                write_target_filtered, config.dedup_dir))
            others["target"] = target_info(target_clusters, routed.filtered,
                                           _checks(targets, "Target"), centroids.plan)
        if self._references is not None:
            others["reference"] = reference_info(
                decisions | "ReferenceDecisions" >> beam.Values(),
                _checks(references, "Reference"), float(1.0 - config.reference_threshold_eps),
                config.reference_exact, config.reference_threshold_eps)
        done = discard_scratch_after(store, all_written)
        info = dedup_info(centroids.plan, centroids.centroids, assigned.sizes,
                          rows.input_checks, config.pairwise_block_size, others)
        return SemanticDedupOutputs(decisions=decisions | "Decisions" >> beam.Values(),
                                    exact=exact.exact, written=done, info=info,
                                    invalid=rows.invalid, filtered=routed.filtered)


def _checks(checked, label: str) -> beam.PCollection:
    """{rows, input_checks} of a CheckedRows (of the reference or target rows)."""
    return checked.input_checks | f"{label}Checks" >> beam.Map(
        lambda checks, n: {"rows": n, "input_checks": checks},
        beam.pvalue.AsSingleton(checked.rows))
