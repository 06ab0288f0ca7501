"""Stage 5, routing: each chunk's members to the pairwise keys, given the cluster sizes (a
side input, O(k)).

A cluster of at most --pairwise_block_size members goes whole into a bin of small clusters
(`blocks.pack_clusters`): key `BinKey`, one element per (chunk, bin). A larger cluster is cut
into nb hash blocks and every unordered block pair is a `BlockPairKey`; each member goes to
the nb pairs of its block. What crosses the shuffle (vectors inline or references) is the
vector store's choice (`VectorStore.routed`).

    Assigned + AsDict(sizes) -> RouteFn -> (BinKey | BlockPairKey as a plain tuple, Part)
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import apache_beam as beam
import numpy as np

from beam_curator.dedup import blocks
from beam_curator.transforms.semdedup.config import DedupConfig
from beam_curator.transforms.semdedup.records import (
    Assigned,
    BinKey,
    BlockPairKey,
    Members,
    Part,
    Placement,
    wire_key,
)
from beam_curator.transforms.semdedup.sources import REFERENCE
from beam_curator.transforms.semdedup.vectors import VectorStore


class RouteFn(beam.DoFn):
    """Assigned -> (key, Part): (BinKey, Part(0, a bin's members carrying their clusters)),
    or (BlockPairKey, Part(the members' block, its members)). With target clusters (a side
    input: --target), a candidate whose home cluster is not one of them goes nowhere: its
    (chunk name, ids, home clusters) go to FILTERED."""

    FILTERED = "filtered_target"

    def __init__(self, config: DedupConfig, store: VectorStore):
        self._config = config
        self._store = store
        self._bins, self._bins_from = None, None
        self._targets, self._targets_from = None, None
        # What crosses the cluster shuffle (docs/scaling.md checks its formulas with these).
        self.routed_rows = beam.metrics.Metrics.counter("curator", "dedup_routed_rows")
        self.routed_vector_bytes = beam.metrics.Metrics.counter("curator",
                                                                "dedup_routed_vector_bytes")

    def _count(self, members: Members) -> None:
        self.routed_rows.inc(len(members))
        if members.vectors is not None:
            self.routed_vector_bytes.inc(int(members.vectors.nbytes))

    def _bin_of(self, sizes: dict) -> dict:
        if self._bins_from is not sizes:   # the side input: one dict per bundle
            self._bins = blocks.pack_clusters(sizes, self._config.pairwise_block_size)
            self._bins_from = sizes
        return self._bins

    def process(self, assigned: Assigned, sizes: dict, target_clusters=None):
        bin_of = self._bin_of(sizes)
        block_rows = self._config.pairwise_block_size
        reference = assigned.chunk.role == REFERENCE
        placements = assigned.placements
        if target_clusters is not None and not reference:
            placements = yield from self._in_target(assigned, target_clusters)
        members = self._store.routed(assigned)
        for clusters, index, border in placements:
            binned = {}
            for cluster, rows in blocks.positions_by_cluster(clusters):
                nb = blocks.n_blocks(sizes[cluster], block_rows)
                if nb == 1:
                    binned.setdefault(bin_of[cluster], []).append((cluster, rows))
                    continue
                group = _flagged(members.take(index[rows]), border)
                block = blocks.block_of(group.ids, nb, cluster)
                for b in np.unique(block).tolist():
                    part = group.take(np.flatnonzero(block == b))
                    for lo, hi in blocks.pair_keys(b, nb):
                        self._count(part)
                        yield wire_key(BlockPairKey(cluster, nb, lo, hi)), Part(b, part, reference)
            for first, parts in binned.items():
                rows = np.concatenate([r for _, r in parts])
                group = dataclasses.replace(
                    _flagged(members.take(index[rows]), border),
                    cluster=np.repeat(np.array([c for c, _ in parts], dtype=np.int64),
                                      [r.size for _, r in parts]))
                self._count(group)
                yield wire_key(BinKey(first)), Part(0, group, reference)

    def _in_target(self, assigned: Assigned, target_clusters):
        """The placements of the candidates whose home cluster is a target cluster; the
        others to FILTERED (a generator: `yield from` it, it returns the placements)."""
        if self._targets_from is not target_clusters:   # the side input: once per bundle
            self._targets = np.array(sorted(target_clusters), dtype=np.int64)
            self._targets_from = target_clusters
        home = assigned.placements[0]
        keep = np.isin(home.clusters, self._targets)
        if not keep.all():
            out = np.flatnonzero(~keep)
            ids = assigned.members.ids
            yield beam.pvalue.TaggedOutput(self.FILTERED, (
                assigned.chunk.name, tuple(ids[i] for i in home.members[out].tolist()),
                home.clusters[out]))
        kept_members = np.zeros(len(assigned.members), dtype=bool)
        kept_members[home.members[keep]] = True
        placements = []
        for placement in assigned.placements:
            rows = kept_members[placement.members]
            if rows.any():
                placements.append(Placement(placement.clusters[rows],
                                            placement.members[rows], placement.border))
        return placements


def _flagged(group: Members, border: bool) -> Members:
    """A second membership's members carry border=True (their home is another cluster)."""
    if not border:
        return group
    return dataclasses.replace(group, border=np.ones(len(group), dtype=bool))


class Routed(NamedTuple):
    groups: beam.PCollection      # (BinKey | BlockPairKey, [Part]): one pairwise key each
    filtered: beam.PCollection    # (chunk name, ids, home clusters) outside --target


class Route(beam.PTransform):
    """Assigned -> Routed: the GroupByKey per cluster (or block pair), given the cluster
    sizes (a PCollection of (cluster, n)) and, with --target, the target clusters (a
    PCollection of cluster numbers, O(k))."""

    def __init__(self, config: DedupConfig, store: VectorStore, sizes: beam.PCollection,
                 target_clusters: Optional[beam.PCollection] = None):
        super().__init__()
        self._config, self._store, self._sizes = config, store, sizes
        self._target_clusters = target_clusters

    def expand(self, assigned):
        side = [beam.pvalue.AsDict(self._sizes)]
        if self._target_clusters is not None:
            side.append(beam.pvalue.AsList(self._target_clusters))
        routed = assigned | "Route" >> beam.ParDo(
            RouteFn(self._config, self._store), *side).with_outputs(RouteFn.FILTERED,
                                                                    main="parts")
        groups = routed.parts | "GroupByClusterBlocks" >> beam.GroupByKey()
        return Routed(groups=groups, filtered=routed[RouteFn.FILTERED])
