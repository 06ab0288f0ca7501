"""Semantic dedup in Beam: exact pre-pass, centroids as a side input, GroupByKey per cluster.

    candidates ─► chunks (ids + a way to load their vectors, never float lists in elements)
               ├─► ExactPrePass: GroupByKey(content hash) -> exact_duplicate, survivor = min id
               ├─► centroids: LoadCentroids(path) | TrainCentroids(hash-sampled rows, faiss)
               └─► Assign(AsSingleton(centroids), AsDict(exact dups))
                   -> (cluster, Members): one columnar element per chunk x cluster
                   -> GroupByKey(cluster) -> rank (hard/easy/random, ties by id)
                   -> pairwise: small cluster in one step; large cluster fanned out as
                      (cluster, block j) keys that each receive blocks i <= j, combined exactly
                   -> kmeans/, pairwise_results/, duplicates/, centroids.npy

How a cluster's vectors reach its pairwise step (DESIGN: never ship float lists):
* `staged`: each chunk's vectors are written once to a raw float32 file under the output's
  `dedup/_staging/`; members carry (file, row) and the pairwise step reads just those rows.
  Best on one machine (the local runners), where files are shared and random access is cheap.
* `shuffle`: members carry their vectors as float32 arrays through the GroupByKey. Best on
  distributed runners, where a shuffle of bytes is cheap and shared random access is not.
The pure algorithms live in `beam_curator.dedup`; this module is only plumbing. The data it
moves (Chunk, Members, Decisions) and the staging/parquet I/O behind them live in
`beam_curator.transforms.dedup_data`; this module holds the config, DoFns and PTransforms.
"""
from __future__ import annotations

import dataclasses
import logging
import uuid
from typing import Dict, List, Optional, Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from beam_curator import outputs
from beam_curator.dedup import kmeans as km
from beam_curator.dedup.assign import (assign_to_centroids, assign_with_runner_up,
                                      border_assignments)
from beam_curator.dedup.pairwise import (block_range, combine_partials, is_duplicate,
                                         local_to_global, partial_max)
from beam_curator.dedup.ranking import rank_cluster
from beam_curator.schema import (DUPLICATES_SCHEMA, EXACT_DUPLICATE, KEPT, KMEANS_SCHEMA,
                                 PAIRWISE_SCHEMA, SEMANTIC_DUPLICATE, SampleResult)
from beam_curator.transforms.dedup_data import (SHUFFLE, STAGED, Chunk, Decisions, Members,
                                                _without_vectors, count_candidates,
                                                parquet_chunks, read_candidate_ids,
                                                read_staged_rows, write_staged)
from beam_curator.transforms.write import write_parquet

_LOG = logging.getLogger(__name__)


# ---- configuration ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DedupConfig:
    output: str
    n_clusters: int = 100
    kmeans_iterations: int = 20
    seed: int = 0
    sample_size: int = 100_000
    centroids_path: Optional[str] = None
    eps: float = 0.01
    which_to_keep: str = "hard"
    block_size: int = 4096
    border_margin: Optional[float] = None
    transport: str = STAGED
    chunk_rows: int = 8192
    id_column: str = "id"
    embedding_column: str = "embedding"

    @property
    def dedup_dir(self) -> str:
        return outputs.dedup_dir(self.output)

    @property
    def staging_dir(self) -> str:
        return FileSystems.join(self.dedup_dir, "_staging")

    @classmethod
    def from_options(cls, options) -> "DedupConfig":
        from beam_curator.options import CuratorOptions, is_local_runner

        opts = options.view_as(CuratorOptions)
        transport = opts.dedup_vector_transport
        if transport == "auto":
            transport = STAGED if is_local_runner(options) else SHUFFLE
        return cls(output=opts.output, n_clusters=opts.n_clusters,
                   kmeans_iterations=opts.kmeans_iterations, seed=opts.kmeans_seed,
                   sample_size=opts.kmeans_sample_size, centroids_path=opts.centroids,
                   eps=opts.eps, which_to_keep=opts.which_to_keep,
                   block_size=opts.pairwise_block_size, border_margin=opts.border_margin,
                   transport=transport, id_column=opts.id_column,
                   embedding_column=opts.embedding_column)


# ---- decisions from per-member maxima ---------------------------------------------------

def _decide(cluster: int, members: Members, max_sim: np.ndarray, argmax: np.ndarray, eps: float,
            id_of_rank) -> Decisions:
    """Turn per-member maxima into decisions; argmax -1 = first-ranked (own id, 0.0, as NeMo)."""
    first = argmax < 0
    sims = np.where(first, np.float32(0.0), max_sim).astype(np.float32)
    dup = is_duplicate(max_sim, eps) & ~first
    max_ids = tuple(own if a < 0 else id_of_rank(int(a))
                    for own, a in zip(members.ids, argmax.tolist()))
    return Decisions(cluster, _without_vectors(members), max_ids, sims, dup)


# ---- DoFns ------------------------------------------------------------------------------

class SampleForTrainingFn(beam.DoFn):
    """Chunk -> (ids, float32 rows or (staged file, dim, rows)) of its training-sample rows."""

    def __init__(self, config: DedupConfig):
        self._config = config

    def process(self, chunk: Chunk, n_total: int, exact_dups: Dict[str, str]):
        ids, _, vectors = chunk.load(self._config)
        fraction = km.sample_fraction(n_total, self._config.sample_size)
        rows = [r for r in np.flatnonzero(km.sample_mask(ids, fraction, self._config.seed))
                if ids[r] not in exact_dups]
        if not rows:
            return
        staged = chunk.staged_copy(self._config)
        # Staged: only (file, rows) travel to the trainer, not 3 kB per sampled row.
        yield [ids[r] for r in rows], ((staged, chunk.dim, np.asarray(rows)) if staged
                                       else vectors[rows])


def train_centroids(sample: List[Tuple[List[str], np.ndarray]], config: DedupConfig
                    ) -> np.ndarray:
    """Sorted by id first, so every runner and chunking trains on the same matrix."""
    ids = [i for part_ids, _ in sample for i in part_ids]
    if not ids:
        return np.zeros((0, 0), dtype=np.float32)
    parts = [v if isinstance(v, np.ndarray) else read_staged_rows(*v) for _, v in sample]
    vectors = np.concatenate(parts)[np.argsort(np.array(ids), kind="stable")]
    k = min(config.n_clusters, len(ids))
    if k < config.n_clusters:
        _LOG.warning("only %d embeddings to train on: using %d clusters instead of "
                     "--n_clusters %d", len(ids), k, config.n_clusters)
    return km.train_kmeans(vectors, k, n_iter=config.kmeans_iterations, seed=config.seed,
                           spherical=True)


class AssignFn(beam.DoFn):
    """Chunk -> (cluster, Members) per cluster present in it; stages vectors when asked."""

    def __init__(self, config: DedupConfig):
        self._config = config
        self.assigned = beam.metrics.Metrics.counter("curator", "dedup_assigned")

    def process(self, chunk: Chunk, centroids: np.ndarray, exact_dups: Dict[str, str]):
        ids, payloads, vectors = chunk.load(self._config)
        keep = np.array([r for r, i in enumerate(ids) if i not in exact_dups], dtype=np.int64)
        if not keep.size or centroids.size == 0:
            return
        # Staged transport: members point into the chunk's staged file (written by `run`'s
        # batching, or by Chunk.load for a parquet row group) instead of carrying vectors.
        staged_path = chunk.staged_copy(self._config)
        vectors = vectors[keep]
        with_border = self._config.border_margin is not None and centroids.shape[0] > 1
        if with_border:   # one similarity pass gives the nearest and the runner-up
            labels, cos_dist, l2_dist, labels2, dists2 = assign_with_runner_up(vectors,
                                                                              centroids)
        else:
            labels, cos_dist, l2_dist = assign_to_centroids(vectors, centroids)
        all_members = Members(
            ids=tuple(ids[r] for r in keep), cos_dist=cos_dist, l2_dist=l2_dist,
            border=np.zeros(keep.size, dtype=bool),
            payloads=tuple(payloads[r] for r in keep) if payloads else None,
            vectors=None if staged_path else vectors,
            paths=(staged_path,) if staged_path else (),
            path_index=np.zeros(keep.size, dtype=np.int32) if staged_path else None,
            rows=keep if staged_path else None)
        self.assigned.inc(keep.size)
        memberships = [(labels, np.arange(keep.size), False)]
        if with_border:
            extra = border_assignments(labels2, dists2, self._config.border_margin)
            if extra:
                rows, clusters = (np.array(x, dtype=np.int64) for x in zip(*extra))
                # The second membership keeps the HOME distance: one rank priority per point
                # in every cluster it joins keeps any two points in the same order
                # everywhere, so a near-duplicate pair can never lose both members.
                memberships.append((clusters, rows, True))
        for clusters, rows, border in memberships:
            for cluster in np.unique(clusters):
                group = all_members.take(rows[clusters == cluster])
                if border:
                    group = dataclasses.replace(group, border=np.ones(len(group), dtype=bool))
                yield int(cluster), group


def _ranked(cluster: int, members: Members, config: DedupConfig) -> Members:
    return members.take(rank_cluster(list(members.ids), members.cos_dist,
                                     config.which_to_keep, config.seed, cluster))


class PairwiseClusterFn(beam.DoFn):
    """(cluster, [Members]) -> (file key, Decisions); large clusters go to `blocks`."""

    BLOCKS = "blocks"

    def __init__(self, config: DedupConfig, dim: int):
        self._config = config
        self._dim = dim

    def process(self, element):
        cluster, parts = element
        ranked = _ranked(cluster, Members.concat(list(parts)), self._config)
        n, size = len(ranked), self._config.block_size
        if n <= size:
            vectors = ranked.load_vectors(self._dim)
            max_sim, argmax = partial_max(vectors, vectors, True)
            yield _cluster_file(cluster), _decide(cluster, ranked, max_sim, argmax,
                                                  self._config.eps, lambda a: ranked.ids[a])
            return
        # Too large for one step: block j of ranked rows meets every block i <= j on its own key.
        for j in range(-(-n // size)):
            j0, j1 = block_range(n, size, j)
            block_j = ranked.take(np.arange(j0, j1))
            for i in range(j + 1):
                i0, i1 = block_range(n, size, i)
                block_i = block_j if i == j else ranked.take(np.arange(i0, i1))
                yield beam.pvalue.TaggedOutput(self.BLOCKS, ((cluster, j), (i0, block_i, j0,
                                                                            block_j)))


class BlockPartialFn(beam.DoFn):
    """((cluster, j), (i0, block i, j0, block j)) -> ((cluster, j), partial for block j)."""

    def __init__(self, dim: int):
        self._dim = dim

    def process(self, element):
        key, (i0, block_i, j0, block_j) = element
        same = i0 == j0
        vi = block_i.load_vectors(self._dim)
        vj = vi if same else block_j.load_vectors(self._dim)
        max_sim, argmax_local = partial_max(vi, vj, same)
        yield key, (i0, max_sim, local_to_global(argmax_local, i0),
                    _without_vectors(block_j) if same else None, block_i.ids)


class CombineBlocksFn(beam.DoFn):
    """All partials of (cluster, block j) -> (file key, Decisions of block j), exactly."""

    def __init__(self, eps: float):
        self._eps = eps

    def process(self, element):
        (cluster, j), partials = element
        partials = sorted(partials, key=lambda p: p[0])   # by i: ties go to earlier rows
        block_j = next(p[3] for p in partials if p[3] is not None)
        id_of = {}
        for i0, _, _, _, ids_i in partials:
            for offset, id_ in enumerate(ids_i):
                id_of[i0 + offset] = id_
        max_sim, argmax = combine_partials([(p[1], p[2]) for p in partials])
        yield (f"{_cluster_file(cluster)}-block-{j:04d}",
               _decide(cluster, block_j, max_sim, argmax, self._eps, id_of.__getitem__))


def merge_memberships(rows) -> tuple:
    """A border point's memberships -> one row: a duplicate if either membership says so.

    rows: (cluster, border, id, payload, cos, l2, max_id, sim, dup) per membership.
    """
    rows = sorted(rows, key=lambda r: (r[1], r[0]))   # the home membership first
    home, dups = rows[0], [r for r in rows if r[8]]
    best = max(dups or rows, key=lambda r: r[7])
    return home[:6] + (best[6], best[7], bool(dups))


def _membership_rows(element):
    _, decisions = element
    m = decisions.members
    for k, (id_, payload, max_id, sim, dup) in enumerate(decisions.rows()):
        yield id_, (decisions.cluster, bool(m.border[k]), id_, payload,
                    float(m.cos_dist[k]), float(m.l2_dist[k]), max_id, sim, dup)


def _decisions_from_rows(element):
    cluster, rows = element
    rows = sorted(rows, key=lambda r: r[2])
    members = Members(ids=tuple(r[2] for r in rows),
                      cos_dist=np.array([r[4] for r in rows], np.float32),
                      l2_dist=np.array([r[5] for r in rows], np.float32),
                      border=np.zeros(len(rows), bool),
                      payloads=tuple(r[3] for r in rows))
    return _cluster_file(cluster), Decisions(
        cluster, members, tuple(r[6] for r in rows), np.array([r[7] for r in rows], np.float32),
        np.array([r[8] for r in rows], bool))


# ---- the transforms ---------------------------------------------------------------------

@dataclasses.dataclass
class DedupOutputs:
    decisions: beam.PCollection  # Decisions per cluster (or block); exact dups not in them
    exact: beam.PCollection      # (dup id, payload, survivor id)
    written: list                # PCollections whose completion means dedup/ is written


@dataclasses.dataclass
class RunDedupOutputs:
    results: beam.PCollection    # SampleResult per candidate: kept / exact / semantic duplicate
    written: list                # completion of OUTPUT/dedup/ and of the staging cleanup


class SemanticDedupCore(beam.PTransform):
    """(chunks, exact-hash pairs) -> DedupOutputs, writing OUTPUT/dedup/."""

    def __init__(self, config: DedupConfig, dim: int):
        super().__init__()
        self._config = config
        self._dim = dim

    def expand(self, inputs):
        chunks, hash_pairs = inputs
        config, p = self._config, chunks.pipeline

        # Exact pre-pass: identical bytes -> the smallest id survives.
        exact = (hash_pairs
                 | "GroupByHash" >> beam.GroupByKey()
                 | "ExactDuplicates" >> beam.FlatMap(_exact_duplicates))
        exact_map = beam.pvalue.AsDict(exact | "DupToSurvivor" >> beam.Map(lambda d: (d[0], d[2])))

        if config.centroids_path:
            path, dim = config.centroids_path, self._dim
            centroids = (p | "CentroidsPath" >> beam.Create([path])
                         | "LoadCentroids" >> beam.Map(lambda f: km.load_centroids(f, dim or None)))
        else:
            n_total = (chunks
                       | "ChunkSizes" >> beam.Map(count_candidates, config)
                       | "CountCandidates" >> beam.CombineGlobally(sum))
            centroids = (chunks
                         | "SampleForKMeans" >> beam.ParDo(SampleForTrainingFn(config),
                                                           beam.pvalue.AsSingleton(n_total),
                                                           exact_map)
                         | "GatherSample" >> beam.combiners.ToList()
                         | "TrainKMeans" >> beam.Map(train_centroids, config))
        centroids_written = centroids | "WriteCentroids" >> beam.Map(
            _write_centroids, FileSystems.join(config.dedup_dir, "centroids.npy"))

        members = chunks | "Assign" >> beam.ParDo(
            AssignFn(config), beam.pvalue.AsSingleton(centroids), exact_map)
        pairwise = (members
                    | "GroupByCluster" >> beam.GroupByKey()
                    | "Pairwise" >> beam.ParDo(PairwiseClusterFn(config, self._dim)).with_outputs(
                        PairwiseClusterFn.BLOCKS, main="results"))
        block_results = (pairwise[PairwiseClusterFn.BLOCKS]
                         | "BlockPartials" >> beam.ParDo(BlockPartialFn(self._dim))
                         | "GroupByBlock" >> beam.GroupByKey()
                         | "CombineBlocks" >> beam.ParDo(CombineBlocksFn(config.eps)))
        # Each element: (file key, Decisions of one cluster or one block of it).
        decisions = (pairwise.results, block_results) | "AllDecisions" >> beam.Flatten()
        if config.border_margin is not None:
            decisions = (decisions
                         | "Memberships" >> beam.FlatMap(_membership_rows)
                         | "GroupMemberships" >> beam.GroupByKey()
                         | "MergeMemberships" >> beam.MapTuple(
                             lambda _, rows: merge_memberships(rows))
                         | "ByHomeCluster" >> beam.Map(lambda r: (r[0], r))
                         | "GroupByHome" >> beam.GroupByKey()
                         | "AsDecisions" >> beam.Map(_decisions_from_rows))
        # Outputs are written where the decisions are made: no further shuffle of rows.
        written_decisions = decisions | "WriteClusterOutputs" >> beam.ParDo(
            WriteClusterOutputsFn(config.dedup_dir))
        results = decisions | "Decisions" >> beam.Values()
        exact_written = (exact
                         | "GatherExact" >> beam.combiners.ToList()
                         | "WriteExact" >> beam.Map(write_exact_outputs, config.dedup_dir))
        written = [centroids_written, written_decisions, exact_written]
        return DedupOutputs(decisions=results, exact=exact, written=written)


class WriteClusterOutputsFn(beam.DoFn):
    """(file key, Decisions) -> kmeans/, pairwise_results/ and duplicates/ files."""

    def __init__(self, dedup_dir: str):
        self._dir = dedup_dir

    def process(self, element):
        key, decisions = element
        m = decisions.members
        order = np.argsort(np.array(m.ids), kind="stable")
        ids = [m.ids[i] for i in order]
        kmeans = pa.table({
            "id": ids, "centroid": pa.array(np.full(len(ids), decisions.cluster, np.int32)),
            "cosine_dist_to_cent": pa.array(m.cos_dist[order], pa.float32()),
            "l2_dist_to_cent": pa.array(m.l2_dist[order], pa.float32())}, schema=KMEANS_SCHEMA)
        pairs = pa.table({
            "id": ids, "max_id": [decisions.max_ids[i] for i in order],
            "cosine_sim_score": pa.array(decisions.cosine_sim[order], pa.float32())},
            schema=PAIRWISE_SCHEMA)
        dups = pa.table({"id": [ids[k] for k, i in enumerate(order)
                                if decisions.is_duplicate[i]]}, schema=DUPLICATES_SCHEMA)
        name = f"{key}.parquet"
        yield write_parquet(FileSystems.join(self._dir, "kmeans", name), kmeans)
        yield write_parquet(FileSystems.join(self._dir, "pairwise_results", name), pairs)
        yield write_parquet(FileSystems.join(self._dir, "duplicates", name), dups)


def write_exact_outputs(exact: list, dedup_dir: str) -> str:
    """Exact duplicates: pairwise rows (max_id = survivor, score 1.0) and removal ids."""
    exact = sorted(exact, key=lambda e: e[0])
    ids = [e[0] for e in exact]
    write_parquet(FileSystems.join(dedup_dir, "pairwise_results", "exact.parquet"), pa.table({
        "id": ids, "max_id": [e[2] for e in exact],
        "cosine_sim_score": pa.array([1.0] * len(ids), pa.float32())}, schema=PAIRWISE_SCHEMA))
    return write_parquet(FileSystems.join(dedup_dir, "duplicates", "exact.parquet"),
                         pa.table({"id": ids}, schema=DUPLICATES_SCHEMA))


def _cluster_file(cluster: int) -> str:
    return f"cluster-{cluster:06d}"


def _exact_duplicates(element):
    """(hash, [(id, payload)]) -> (dup id, payload, survivor id) for all but the smallest id."""
    _, members = element
    members = sorted(members, key=lambda m: m[0])
    survivor = members[0][0]
    if len(members) > 1:   # the live progress line shows it (progress.FIELDS)
        beam.metrics.Metrics.counter("curator", "exact_duplicates").inc(len(members) - 1)
    for dup_id, payload in members[1:]:
        yield dup_id, payload, survivor


def _write_centroids(centroids: np.ndarray, path: str) -> str:
    if centroids.size:
        km.save_centroids(path, centroids)
    return path


class StageCandidatesFn(beam.DoFn):
    """A batch of (SampleInfo, embedding) -> a Chunk (vectors staged to a file or inline)."""

    def __init__(self, config: DedupConfig):
        self._config = config

    def process(self, batch):
        infos = tuple(info for info, _ in batch)
        vectors = np.stack([np.asarray(e, dtype=np.float32) for _, e in batch])
        name = uuid.uuid4().hex   # a file name only: results never depend on it
        common = dict(name=name, ids=tuple(i.id for i in infos), payloads=infos,
                      dim=vectors.shape[1])
        if self._config.transport == STAGED:
            path = write_staged(FileSystems.join(self._config.staging_dir, f"{name}.f32"),
                                vectors)
            yield Chunk(staged_path=path, **common)
        else:
            yield Chunk(inline=vectors, **common)


class Deduplicate(beam.PTransform):
    """`run`'s dedup: (SampleInfo, embedding) that passed the filters -> SampleResults.

    Returns an object with `.results` (SampleResult per input: kept / exact_duplicate /
    semantic_duplicate) and `.written` (completion of OUTPUT/dedup/ and staging cleanup).
    """

    def __init__(self, config: DedupConfig, dim: int):
        super().__init__()
        self._config = config
        self._dim = dim

    def expand(self, passed):
        config = self._config
        chunks = (passed
                  | "Batch" >> beam.BatchElements(min_batch_size=1,
                                                  max_batch_size=config.chunk_rows)
                  | "Stage" >> beam.ParDo(StageCandidatesFn(config)))
        hash_pairs = passed | "HashPairs" >> beam.MapTuple(
            lambda info, _: (info.content_hash or info.id, (info.id, info)))
        core = (chunks, hash_pairs) | "SemDeDup" >> SemanticDedupCore(config, self._dim)
        semantic = core.decisions | "ToSampleResults" >> beam.FlatMap(_sample_results)
        exact = core.exact | "ExactResults" >> beam.Map(lambda e: SampleResult(
            info=e[1], status=EXACT_DUPLICATE, duplicate_of=e[2], cosine_sim=1.0))
        results = (semantic, exact) | "DedupResults" >> beam.Flatten()
        written = _cleanup_after(config, core.written)
        return RunDedupOutputs(results=results, written=[written])


def _sample_results(decisions: Decisions):
    n_dups = int(np.count_nonzero(decisions.is_duplicate))   # counters for the live progress line
    beam.metrics.Metrics.counter("curator", "semantic_duplicates").inc(n_dups)
    beam.metrics.Metrics.counter("curator", "kept").inc(len(decisions.is_duplicate) - n_dups)
    for _, info, max_id, sim, dup in decisions.rows():
        yield SampleResult(info=info, status=SEMANTIC_DUPLICATE if dup else KEPT,
                           cluster=decisions.cluster, duplicate_of=max_id if dup else None,
                           cosine_sim=sim)


def _cleanup_after(config: DedupConfig, written: list):
    """Delete dedup/_staging once every dedup output is written (side inputs order it)."""
    staging = config.staging_dir

    def cleanup(_, *done):
        if FileSystems.exists(staging):
            FileSystems.delete([staging])
        return staging

    p = written[0].pipeline
    return (p
            | "CleanupOnce" >> beam.Create([None])
            | "DeleteStaging" >> beam.Map(cleanup, *[beam.pvalue.AsList(w) for w in written]))


# ---- the `dedup` command: from an embeddings parquet --------------------------------------

class HashPairsFn(beam.DoFn):
    """Parquet chunk -> (content_hash, (id, None)) of its candidate rows."""

    def __init__(self, config: DedupConfig):
        self._config = config

    def process(self, chunk: Chunk):
        for id_, digest in read_candidate_ids(chunk.parquet, self._config, with_hash=True):
            yield (digest or id_), (id_, None)


class DedupFromParquet(beam.PTransform):
    """Step 2 of the three-step flow: embeddings parquet -> OUTPUT/dedup/ + summary.json."""

    def __init__(self, pattern: str, config: DedupConfig, recorded_options: Optional[dict] = None,
                 claim_token: Optional[str] = None):
        super().__init__()
        self._pattern = pattern
        self._config = config
        self._recorded = recorded_options
        self._claim_token = claim_token

    def expand(self, pbegin):
        config = self._config
        chunk_list, dim, has_hash = parquet_chunks(self._pattern, config)
        if config.transport == SHUFFLE:
            _LOG.info("dedup: vectors travel through the shuffle as float32 bytes")
        chunks = pbegin | "RowGroups" >> beam.Create(chunk_list)
        if has_hash:
            hash_pairs = chunks | "HashPairs" >> beam.ParDo(HashPairsFn(config))
        else:
            hash_pairs = pbegin | "NoHashes" >> beam.Create([])
        core = (chunks, hash_pairs) | "SemDeDup" >> SemanticDedupCore(config, dim)
        done = _cleanup_after(config, core.written)
        n_exact = core.exact | "CountExact" >> beam.combiners.Count.Globally()
        n_semantic = (core.decisions
                      | "DecisionCounts" >> beam.Map(
                          lambda d: (len(d), int(d.is_duplicate.sum()), d.cluster))
                      | "Gather" >> beam.combiners.ToList())
        summary = {"command": "dedup", "options": self._recorded, "eps": config.eps,
                   "which_to_keep": config.which_to_keep}
        return (pbegin
                | "SummaryOnce" >> beam.Create([None])
                | "WriteDedupSummary" >> beam.Map(
                    _write_dedup_summary, config, summary, self._claim_token,
                    beam.pvalue.AsSingleton(n_exact),
                    beam.pvalue.AsSingleton(n_semantic), beam.pvalue.AsList(done)))


def _write_dedup_summary(_, config, summary, claim_token, n_exact, semantic_counts, done):
    summary = dict(summary,
                   n_embeddings=n_exact + sum(n for n, _, _ in semantic_counts),
                   n_duplicates=n_exact + sum(d for _, d, _ in semantic_counts),
                   n_exact_duplicates=n_exact,
                   n_clusters=len({c for _, _, c in semantic_counts}))
    from beam_curator.ownership import finish_output

    return finish_output(config.output, summary, claim_token)
