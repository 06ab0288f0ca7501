"""Stage 3, centroids: the candidates counted -> the plan (k, the k-means sample's size) ->
centroids, trained on a hash-sampled subset or loaded from --centroids, written to
dedup/centroids.npy; every later step takes them as a side input (O(k) in one process).

    Chunk -> count (a combiner) -> DedupPlan
          -> SampleForTrainingFn: one small file per chunk; only its path travels
          -> ToList of paths -> train (spherical k-means) | load --centroids
"""
from __future__ import annotations

import concurrent.futures
import logging
from typing import List, NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems

from beam_curator.dedup import kmeans as km
from beam_curator.transforms.semdedup.config import DedupConfig, DedupPlan, make_plan
from beam_curator.transforms.semdedup.sources import Chunk
from beam_curator.transforms.semdedup.vectors import VectorStore

_LOG = logging.getLogger(__name__)


class SampleForTrainingFn(beam.DoFn):
    """Chunk -> the path of a small file holding its training-sample rows (ids + vectors).

    Only the path travels to the trainer. Shipping the rows themselves made one record of
    every bundle's sample (Beam lifts the gathering combine into the SDK): ~100 MB at 1M rows,
    which Flink's batch sort refused ("Record too large"), and O(k) bytes per record at scale.
    """

    def __init__(self, config: DedupConfig, store: VectorStore):
        self._config = config
        self._store = store

    def process(self, chunk: Chunk, plan: DedupPlan):
        ids, vectors = self._store.load(chunk)
        fraction = km.sample_fraction(plan.n_candidates, plan.sample_size)
        rows = [r for r in np.flatnonzero(km.sample_mask(ids, fraction,
                                                         self._config.kmeans_seed))
                if ids[r] not in chunk.excluded]
        if rows:
            yield self._store.write_sample(chunk, [ids[r] for r in rows], vectors[rows])


# Sample files are read in parallel: at 1B rows the trainer opens ~100k small remote files.
_SAMPLE_READERS = 16


def train_centroids(sample_files: List[str], config: DedupConfig, store: VectorStore,
                    plan: DedupPlan) -> np.ndarray:
    """Sorted by id first, so every runner and chunking trains on the same matrix."""
    with concurrent.futures.ThreadPoolExecutor(_SAMPLE_READERS) as pool:
        parts = list(pool.map(store.read_sample, sorted(sample_files)))
    ids = [i for part_ids, _ in parts for i in part_ids]
    if not ids:
        return np.zeros((0, 0), dtype=np.float32)
    vectors = _in_id_order(ids, parts)
    k = min(plan.n_clusters, len(ids))
    _LOG.info("k-means: %d clusters (%s) trained on %d embeddings", k, plan.n_clusters_from,
              len(ids))
    return km.train_kmeans(vectors, k, n_iter=config.kmeans_iterations,
                           seed=config.kmeans_seed, spherical=True, device=config.device)


def _in_id_order(ids: List[str], parts: list) -> np.ndarray:
    """The parts' vectors as one matrix, rows sorted by id (stable), emptying `parts` as it
    goes: the sample plus one copy at the peak, where concatenating then sorting held three
    (60 GB instead of 40 at 1B rows' 20 GB sample)."""
    order = np.argsort(np.array(ids), kind="stable")
    position = np.empty_like(order)
    position[order] = np.arange(order.size)   # row of the concatenation -> its sorted row
    vectors = np.empty((len(ids), parts[0][1].shape[1]), dtype=np.float32)
    start = 0
    for p in range(len(parts)):
        part = parts[p][1]
        parts[p] = None
        vectors[position[start:start + len(part)]] = part
        start += len(part)
    return vectors


def _write_centroids(centroids: np.ndarray, path: str) -> str:
    if centroids.size:
        km.save_centroids(path, centroids)
    return path


class CentroidsOutputs(NamedTuple):
    plan: beam.PCollection        # one DedupPlan
    centroids: beam.PCollection   # one float32 (k, d) array ((0, 0): no candidates)
    written: beam.PCollection     # the path of dedup/centroids.npy


class Centroids(beam.PTransform):
    """Chunk (exact copies excluded) -> CentroidsOutputs."""

    def __init__(self, config: DedupConfig, store: VectorStore):
        super().__init__()
        self._config, self._store = config, store

    def expand(self, chunks):
        config = self._config
        plan = (chunks
                | "ChunkSizes" >> beam.Map(lambda c: c.count_candidates(config))
                | "CountCandidates" >> beam.CombineGlobally(sum)
                | "Plan" >> beam.Map(make_plan, config))
        if config.centroids:
            centroids = (chunks.pipeline
                         | "CentroidsPath" >> beam.Create([config.centroids])
                         | "LoadCentroids" >> beam.Map(km.load_centroids))
        else:
            centroids = (chunks
                         | "SampleForKMeans" >> beam.ParDo(SampleForTrainingFn(config, self._store),
                                                           beam.pvalue.AsSingleton(plan))
                         # one path per chunk; the rows (~64 per centroid) stay in files
                         | "GatherSample" >> beam.combiners.ToList()
                         | "TrainKMeans" >> beam.Map(train_centroids, config, self._store,
                                                     beam.pvalue.AsSingleton(plan)))
        written = centroids | "WriteCentroids" >> beam.Map(
            _write_centroids, FileSystems.join(config.dedup_dir, "centroids.npy"))
        return CentroidsOutputs(plan=plan, centroids=centroids, written=written)
