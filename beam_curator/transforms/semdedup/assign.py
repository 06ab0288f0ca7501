"""Stage 4, assignment: each candidate's nearest centroid (a side input), and with
--border_margin its runner-up when that is nearly as near; the cluster sizes follow from a
combiner (O(k)).

    Chunk + AsSingleton(centroids) -> AssignFn -> Assigned (no vectors in it)
          -> (cluster, n) per chunk -> CombinePerKey(sum) -> cluster sizes
"""
from __future__ import annotations

from typing import NamedTuple

import apache_beam as beam
import numpy as np

from beam_curator.dedup.assign import (
    assign_to_centroids,
    assign_with_runner_up,
    border_assignments,
)
from beam_curator.transforms.semdedup.config import DedupConfig
from beam_curator.transforms.semdedup.records import Assigned, Members, Placement
from beam_curator.transforms.semdedup.sources import Chunk
from beam_curator.transforms.semdedup.vectors import VectorStore
from beam_curator.transforms.write_behind import WriteBehindDoFn


class AssignFn(WriteBehindDoFn):
    """Chunk -> Assigned: each candidate's nearest centroid (and runner-up with a margin).
    What the vector store keeps for the pairwise step is written behind, during the next
    chunk's assignment."""

    def __init__(self, config: DedupConfig, store: VectorStore):
        self._config = config
        self._store = store
        self.assigned = beam.metrics.Metrics.counter("curator", "dedup_assigned")

    def process(self, chunk: Chunk, centroids: np.ndarray):
        ids, vectors = self._store.load(chunk)
        keep = np.array([r for r, i in enumerate(ids) if i not in chunk.excluded],
                        dtype=np.int64)
        if not keep.size or centroids.size == 0:
            return
        if keep.size < len(ids):   # exact copies out; else no copy of the chunk's vectors
            vectors = vectors[keep]
        device = self._config.device
        with_border = self._config.border_margin is not None and centroids.shape[0] > 1
        if with_border:   # one similarity pass gives the nearest and the runner-up
            labels, cos_dist, l2_dist, labels2, dists2 = assign_with_runner_up(
                vectors, centroids, device=device)
        else:
            labels, cos_dist, l2_dist = assign_to_centroids(vectors, centroids, device=device)
        where = self._store.placed(chunk, vectors, labels, keep, self._writes.submit)
        members = Members(ids=tuple(ids[r] for r in keep), cos_dist=cos_dist, l2_dist=l2_dist,
                          border=np.zeros(keep.size, dtype=bool), dim=chunk.dim, **where)
        placements = [Placement(labels, np.arange(keep.size), False)]
        if with_border:
            extra = border_assignments(labels2, dists2, self._config.border_margin)
            if extra:
                rows, clusters = (np.array(x, dtype=np.int64) for x in zip(*extra))
                # The second membership keeps the HOME distance: one rank priority per point
                # in every cluster it joins keeps any two points in the same order
                # everywhere, so a near-duplicate pair can never lose both members.
                placements.append(Placement(clusters, rows, True))
        self.assigned.inc(keep.size)
        yield Assigned(chunk=chunk, members=members, placements=tuple(placements))


class AssignOutputs(NamedTuple):
    assigned: beam.PCollection    # Assigned, one per chunk with candidates
    sizes: beam.PCollection       # (cluster, members), home and border memberships


class Assign(beam.PTransform):
    """Chunk -> AssignOutputs, given the centroids (a singleton PCollection)."""

    def __init__(self, config: DedupConfig, store: VectorStore, centroids: beam.PCollection):
        super().__init__()
        self._config, self._store, self._centroids = config, store, centroids

    def expand(self, chunks):
        assigned = chunks | "Assign" >> beam.ParDo(AssignFn(self._config, self._store),
                                                   beam.pvalue.AsSingleton(self._centroids))
        sizes = (assigned
                 | "ClusterCounts" >> beam.FlatMap(lambda a: a.cluster_counts())
                 | "ClusterSizes" >> beam.CombinePerKey(sum))
        return AssignOutputs(assigned=assigned, sizes=sizes)


class TargetClustersFn(beam.DoFn):
    """--target: a target chunk -> the clusters its rows are nearest to (each once)."""

    def __init__(self, config: DedupConfig, store: VectorStore):
        self._config = config
        self._store = store

    def process(self, chunk: Chunk, centroids: np.ndarray):
        _, vectors = self._store.load(chunk)
        if not len(vectors) or centroids.size == 0:
            return
        labels, _, _ = assign_to_centroids(vectors, centroids, device=self._config.device)
        yield from np.unique(labels).tolist()


class TargetClusters(beam.PTransform):
    """Target chunks -> the distinct clusters they touch (at most k elements)."""

    def __init__(self, config: DedupConfig, store: VectorStore, centroids: beam.PCollection):
        super().__init__()
        self._config, self._store, self._centroids = config, store, centroids

    def expand(self, chunks):
        return (chunks
                | "TargetLabels" >> beam.ParDo(TargetClustersFn(self._config, self._store),
                                               beam.pvalue.AsSingleton(self._centroids))
                | "DistinctTargetClusters" >> beam.Distinct())
