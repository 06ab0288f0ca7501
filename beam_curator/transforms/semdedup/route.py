"""Stage 5, routing: each chunk's members to the pairwise keys, given the cluster sizes (a
side input, O(k)).

A cluster of at most --pairwise_block_size members goes whole into a bin of small clusters
(`blocks.pack_clusters`): key `BinKey`, one element per (chunk, bin). A larger cluster is cut
into nb hash blocks and every unordered block pair is a `BlockPairKey`; each member goes to
the nb pairs of its block. What crosses the shuffle (vectors inline or references) is the
vector store's choice (`VectorStore.routed`).

    Assigned + AsDict(sizes) -> RouteFn -> (BinKey | BlockPairKey, (block, Members))
"""
from __future__ import annotations

import dataclasses

import apache_beam as beam
import numpy as np

from beam_curator.dedup import blocks
from beam_curator.transforms.semdedup.config import DedupConfig
from beam_curator.transforms.semdedup.records import Assigned, BinKey, BlockPairKey, Members
from beam_curator.transforms.semdedup.vectors import VectorStore


class RouteFn(beam.DoFn):
    """Assigned -> (key, (block, Members)): (BinKey, (0, a bin's members carrying their
    clusters)), or (BlockPairKey, (the members' block, its members))."""

    def __init__(self, config: DedupConfig, store: VectorStore):
        self._config = config
        self._store = store
        self._bins, self._bins_from = None, None
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

    def process(self, assigned: Assigned, sizes: dict):
        bin_of = self._bin_of(sizes)
        block_rows = self._config.pairwise_block_size
        members = self._store.routed(assigned)
        for clusters, index, border in assigned.placements:
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
                        yield BlockPairKey(cluster, nb, lo, hi), (b, part)
            for first, parts in binned.items():
                rows = np.concatenate([r for _, r in parts])
                group = dataclasses.replace(
                    _flagged(members.take(index[rows]), border),
                    cluster=np.repeat(np.array([c for c, _ in parts], dtype=np.int64),
                                      [r.size for _, r in parts]))
                self._count(group)
                yield BinKey(first), (0, group)


def _flagged(group: Members, border: bool) -> Members:
    """A second membership's members carry border=True (their home is another cluster)."""
    if not border:
        return group
    return dataclasses.replace(group, border=np.ones(len(group), dtype=bool))


class Route(beam.PTransform):
    """Assigned -> (BinKey | BlockPairKey, [(block, Members)]): the GroupByKey per cluster
    (or block pair), given the cluster sizes (a PCollection of (cluster, n))."""

    def __init__(self, config: DedupConfig, store: VectorStore, sizes: beam.PCollection):
        super().__init__()
        self._config, self._store, self._sizes = config, store, sizes

    def expand(self, assigned):
        return (assigned
                | "Route" >> beam.ParDo(RouteFn(self._config, self._store),
                                        beam.pvalue.AsDict(self._sizes))
                | "GroupByClusterBlocks" >> beam.GroupByKey())
