"""Semantic dedup in Beam: exact pre-pass, centroids as a side input, a GroupByKey per cluster
(or per block pair of a large cluster), SemDeDup's keep rule.

    embeddings parquet ─► chunks (row-group references; vectors are read where needed)
      ├─► exact pre-pass: GroupByKey(content hash), the smallest id survives; the copies
      │   reach their chunk by a keyed join (never a broadcast)
      ├─► plan: candidates counted by a combiner -> n_clusters (~1 per 10,000 when not given)
      │   and the k-means sample (sized by k) -> centroids: LoadCentroids | TrainCentroids
      ├─► Assign(AsSingleton(centroids)) -> cluster sizes (a combiner: O(k))
      └─► Route: a cluster of n <= block_rows members is one key; a larger one is cut into
          ceil(n / block_rows) hash blocks and every block pair {a, b} is its own key
          -> GroupByKey -> pairwise -> (block pairs: partials combined per block, exactly)
          -> kmeans/, pairwise_results/, duplicates/, centroids.npy

No step holds more than O(k) (centroids, cluster sizes) or one key's members (at most about
2 x block_rows) in one process. Vectors cross a shuffle at most once: `staged` (local
runners) moves (file, row) references through the GroupByKey and reads the rows from raw
files under `dedup/_staging/`; `shuffle` moves float32 arrays once. A member of a cluster cut
into nb blocks takes part in nb block pairs (that is the price of spreading one cluster over
workers; at the default sizes most clusters are one block).

The pure algorithms live in `beam_curator.dedup`; the elements this module moves and their
I/O live in `beam_curator.transforms.dedup_data`.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import List, NamedTuple, Optional, Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from beam_curator import outputs
from beam_curator.dedup import blocks
from beam_curator.dedup import kmeans as km
from beam_curator.dedup.assign import (assign_to_centroids, assign_with_runner_up,
                                      border_assignments)
from beam_curator.dedup.pairwise import is_duplicate, max_sim_to_earlier
from beam_curator.schema import (DUPLICATES_SCHEMA, EXACT_DUPLICATE, KEPT, KMEANS_SCHEMA,
                                 PAIRWISE_SCHEMA, SEMANTIC_DUPLICATE, SampleResult, shard_of_id)
from beam_curator.transforms.dedup_data import (STAGED, SHUFFLE, Assigned, BlockPartial, Chunk,
                                                Decisions, Members, chunk_names,
                                                count_candidates, embeddings_schema,
                                                npy_chunks, npy_id_column, npy_shape,
                                                read_staged_rows,
                                                row_group_chunks, without_vectors)
from beam_curator.transforms.summary import sum_pairs
from beam_curator.transforms.write import write_parquet

_LOG = logging.getLogger(__name__)


# ---- configuration and the plan -----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DedupConfig:
    output: str
    n_clusters: Optional[int] = None          # None: from the data (blocks.auto_n_clusters)
    kmeans_iterations: int = 20
    seed: int = 0
    sample_size: Optional[int] = None         # None: sized by k (blocks.auto_sample_size)
    centroids_path: Optional[str] = None
    eps: float = 0.01
    which_to_keep: str = "hard"
    block_rows: int = blocks.DEFAULT_BLOCK_ROWS
    border_margin: Optional[float] = None
    transport: str = STAGED
    id_column: str = "id"
    embedding_column: str = "embedding"
    device: Optional[str] = None              # where the dense math runs (dedup.backend)

    @property
    def dedup_dir(self) -> str:
        return outputs.dedup_dir(self.output)

    @property
    def staging_dir(self) -> str:
        return FileSystems.join(self.dedup_dir, "_staging")

    @classmethod
    def from_options(cls, options) -> "DedupConfig":
        from beam_curator.options import CuratorOptions, resolve_vector_transport

        opts = options.view_as(CuratorOptions)
        return cls(output=opts.output, n_clusters=opts.n_clusters,
                   kmeans_iterations=opts.kmeans_iterations, seed=opts.kmeans_seed,
                   sample_size=opts.kmeans_sample_size, centroids_path=opts.centroids,
                   eps=opts.eps, which_to_keep=opts.which_to_keep,
                   block_rows=opts.pairwise_block_size, border_margin=opts.border_margin,
                   transport=resolve_vector_transport(options), id_column=opts.id_column,
                   embedding_column=opts.embedding_column, device=opts.dedup_device)


@dataclasses.dataclass(frozen=True)
class DedupPlan:
    """What the data decided: written into summary.json and shown in the report."""

    n_candidates: int
    n_clusters: int
    n_clusters_from: str       # "--n_clusters", "auto (1 per 10,000 candidates)", ...
    sample_size: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def make_plan(n_candidates: int, config: DedupConfig) -> DedupPlan:
    if config.n_clusters is None:
        k = blocks.auto_n_clusters(n_candidates)
        source = f"auto: 1 per {blocks.ROWS_PER_CLUSTER:,} candidates"
    else:
        k, source = config.n_clusters, "--n_clusters"
    if 0 < n_candidates < k:
        _LOG.warning("only %d candidates: using %d clusters instead of --n_clusters %d",
                     n_candidates, n_candidates, k)
        k, source = n_candidates, f"--n_clusters {config.n_clusters}, lowered to the candidates"
    if config.centroids_path:
        source = "--centroids"
    sample = (config.sample_size if config.sample_size is not None
              else blocks.auto_sample_size(k))
    return DedupPlan(n_candidates=n_candidates, n_clusters=k, n_clusters_from=source,
                     sample_size=min(sample, n_candidates))


class ExactDuplicate(NamedTuple):
    id: str
    survivor: str
    chunk: str            # the chunk the copy was read from: where its outputs are written


# ---- exact pre-pass ---------------------------------------------------------------------

class HashPairsFn(beam.DoFn):
    """Chunk -> (content hash, (id, chunk name)) of its candidate rows (no vectors read)."""

    def __init__(self, config: DedupConfig):
        self._config = config

    def process(self, chunk: Chunk):
        for id_, digest in chunk.ids(self._config, with_hash=True):
            yield (digest or id_), (id_, chunk.name)


def _exact_duplicates(element):
    """(hash, [(id, chunk)]) -> ExactDuplicate for all but the smallest id."""
    _, members = element
    members = sorted(members)
    survivor = members[0][0]
    if len(members) > 1:   # the live progress line shows it (progress.FIELDS)
        beam.metrics.Metrics.counter("curator", "exact_duplicates").inc(len(members) - 1)
    for dup_id, chunk in members[1:]:
        yield ExactDuplicate(dup_id, survivor, chunk)


def _with_exclusions(element) -> Chunk:
    _, grouped = element
    (chunk,) = grouped["chunk"]
    return dataclasses.replace(chunk, excluded=frozenset(grouped["excluded"]))


# ---- centroids --------------------------------------------------------------------------

class SampleForTrainingFn(beam.DoFn):
    """Chunk -> (ids, float32 rows or (staged file, dim, rows)) of its training-sample rows."""

    def __init__(self, config: DedupConfig):
        self._config = config

    def process(self, chunk: Chunk, plan: DedupPlan):
        ids, vectors = chunk.load(self._config)
        fraction = km.sample_fraction(plan.n_candidates, plan.sample_size)
        rows = [r for r in np.flatnonzero(km.sample_mask(ids, fraction, self._config.seed))
                if ids[r] not in chunk.excluded]
        if not rows:
            return
        staged = chunk.staged_copy(self._config)
        # Staged: only (file, rows) travel to the trainer, not 3 kB per sampled row.
        yield [ids[r] for r in rows], ((staged, chunk.dim, np.asarray(rows)) if staged
                                       else vectors[rows])


def train_centroids(sample: List[Tuple[List[str], np.ndarray]], config: DedupConfig,
                    plan: DedupPlan) -> np.ndarray:
    """Sorted by id first, so every runner and chunking trains on the same matrix."""
    ids = [i for part_ids, _ in sample for i in part_ids]
    if not ids:
        return np.zeros((0, 0), dtype=np.float32)
    parts = [v if isinstance(v, np.ndarray) else read_staged_rows(*v) for _, v in sample]
    vectors = np.concatenate(parts)[np.argsort(np.array(ids), kind="stable")]
    k = min(plan.n_clusters, len(ids))
    _LOG.info("k-means: %d clusters (%s) trained on %d embeddings", k, plan.n_clusters_from,
              len(ids))
    return km.train_kmeans(vectors, k, n_iter=config.kmeans_iterations, seed=config.seed,
                           spherical=True, device=config.device)


def _write_centroids(centroids: np.ndarray, path: str) -> str:
    if centroids.size:
        km.save_centroids(path, centroids)
    return path


# ---- assignment and routing -------------------------------------------------------------

class AssignFn(beam.DoFn):
    """Chunk -> Assigned: each candidate's nearest centroid (and runner-up with a margin)."""

    def __init__(self, config: DedupConfig):
        self._config = config
        self.assigned = beam.metrics.Metrics.counter("curator", "dedup_assigned")

    def process(self, chunk: Chunk, centroids: np.ndarray):
        ids, vectors = chunk.load(self._config)
        keep = np.array([r for r, i in enumerate(ids) if i not in chunk.excluded],
                        dtype=np.int64)
        if not keep.size or centroids.size == 0:
            return
        vectors = vectors[keep]
        with_border = self._config.border_margin is not None and centroids.shape[0] > 1
        if with_border:   # one similarity pass gives the nearest and the runner-up
            labels, cos_dist, l2_dist, labels2, dists2 = assign_with_runner_up(
                vectors, centroids, device=self._config.device)
        else:
            labels, cos_dist, l2_dist = assign_to_centroids(vectors, centroids,
                                                            device=self._config.device)
        staged = chunk.staged_copy(self._config)
        members = Members(
            ids=tuple(ids[r] for r in keep), cos_dist=cos_dist, l2_dist=l2_dist,
            border=np.zeros(keep.size, dtype=bool), paths=(staged,) if staged else (),
            path_index=np.zeros(keep.size, dtype=np.int32) if staged else None, rows=keep)
        memberships = [(labels, np.arange(keep.size), False)]
        if with_border:
            extra = border_assignments(labels2, dists2, self._config.border_margin)
            if extra:
                rows, clusters = (np.array(x, dtype=np.int64) for x in zip(*extra))
                # The second membership keeps the HOME distance: one rank priority per point
                # in every cluster it joins keeps any two points in the same order
                # everywhere, so a near-duplicate pair can never lose both members.
                memberships.append((clusters, rows, True))
        self.assigned.inc(keep.size)
        yield Assigned(chunk=chunk, members=members, memberships=tuple(memberships))


class RouteFn(beam.DoFn):
    """Assigned -> ((cluster, nb, lo, hi), (block, Members)): one key per cluster of at most
    block_rows members; for larger ones one key per block pair, each member in nb of them."""

    def __init__(self, config: DedupConfig):
        self._config = config
        # What crosses the cluster shuffle (docs/scaling.md checks its formulas with these).
        self.routed_rows = beam.metrics.Metrics.counter("curator", "dedup_routed_rows")
        self.routed_vector_bytes = beam.metrics.Metrics.counter("curator",
                                                                "dedup_routed_vector_bytes")

    def _count(self, members: Members) -> None:
        self.routed_rows.inc(len(members))
        if members.vectors is not None:
            self.routed_vector_bytes.inc(int(members.vectors.nbytes))

    def process(self, assigned: Assigned, sizes: dict):
        members = assigned.members
        if self._config.transport == SHUFFLE:   # vectors travel inline: read them once more
            _, vectors = assigned.chunk.load(self._config)
            members = dataclasses.replace(members, vectors=vectors[members.rows], paths=(),
                                          path_index=None, rows=None)
        for clusters, index, border in assigned.memberships:
            for cluster in np.unique(clusters).tolist():
                group = members.take(index[clusters == cluster])
                if border:
                    group = dataclasses.replace(group, border=np.ones(len(group), dtype=bool))
                nb = blocks.n_blocks(sizes[cluster], self._config.block_rows)
                if nb == 1:
                    self._count(group)
                    yield (cluster, 1, 0, 0), (0, group)
                    continue
                block = blocks.block_of(group.ids, nb, cluster)
                for b in np.unique(block).tolist():
                    part = group.take(np.flatnonzero(block == b))
                    for lo, hi in blocks.pair_keys(b, nb):
                        self._count(part)
                        yield (cluster, nb, lo, hi), (b, part)


def _cluster_file(cluster: int, nb: int = 1, block: int = 0) -> str:
    return f"cluster-{cluster:06d}" if nb == 1 else f"cluster-{cluster:06d}-block-{block:04d}"


def _rank_sorted(cluster: int, members: Members, config: DedupConfig, dim: int):
    """(members in rank order with vectors, their vectors, their primary rank keys)."""
    primary = blocks.rank_primary(members.ids, members.cos_dist, config.which_to_keep,
                                  config.seed, cluster)
    order = blocks.rank_order(members.ids, primary)
    ranked = members.take(order)
    return ranked, ranked.load_vectors(dim), primary[order]


def _decide(cluster: int, members: Members, max_sim: np.ndarray, has_earlier: np.ndarray,
            max_ids, eps: float) -> Decisions:
    """First-ranked (nothing earlier): its own id and 0.0, as NeMo writes."""
    sims = np.where(has_earlier, max_sim, np.float32(0.0)).astype(np.float32)
    dup = is_duplicate(sims, eps) & has_earlier
    max_ids = tuple(m if h else own for own, m, h in zip(members.ids, max_ids,
                                                         has_earlier.tolist()))
    return Decisions(cluster, without_vectors(members), max_ids, sims, dup)


class PairwiseFn(beam.DoFn):
    """One key's members -> (file key, Decisions) for a one-block cluster; for a block pair,
    a BlockPartial per block to the `partials` output."""

    PARTIALS = "partials"

    def __init__(self, config: DedupConfig, dim: int):
        self._config = config
        self._dim = dim
        self.key_rows = beam.metrics.Metrics.distribution("curator", "dedup_rows_per_key")
        self.similarities = beam.metrics.Metrics.counter("curator",
                                                         "dedup_pairwise_similarities")

    def process(self, element):
        (cluster, nb, lo, hi), parts = element
        by_block = {}
        for b, members in parts:
            by_block.setdefault(b, []).append(members)
        ranked = {b: _rank_sorted(cluster, Members.concat(ms), self._config, self._dim)
                  for b, ms in by_block.items()}
        sizes = [len(r[0]) for r in ranked.values()]
        self.key_rows.update(sum(sizes))
        # similarities computed: n(n-1)/2 on a diagonal, n_a x n_b between two blocks
        self.similarities.inc(sizes[0] * (sizes[0] - 1) // 2 if len(sizes) == 1 else
                       sizes[0] * sizes[1])
        if nb == 1:
            members, vectors, _ = ranked[0]
            max_sim, argmax = max_sim_to_earlier(vectors, blocks.TILE_ROWS,
                                                 device=self._config.device)
            max_ids = [members.ids[a] if a >= 0 else None for a in argmax.tolist()]
            yield _cluster_file(cluster), _decide(cluster, members, max_sim, argmax >= 0,
                                                  max_ids, self._config.eps)
            return
        if lo == hi:
            members, vectors, primary = ranked[lo]
            sim, source_primary, source_id = blocks.diagonal_partial(
                vectors, members.ids, primary, device=self._config.device)
            yield beam.pvalue.TaggedOutput(self.PARTIALS, ((cluster, nb, lo), BlockPartial(
                without_vectors(members), sim, source_primary, source_id)))
            return
        for target, source in ((hi, lo), (lo, hi)):
            if target not in ranked or source not in ranked:
                continue   # an empty block: nothing to compare
            t_members, t_vectors, t_primary = ranked[target]
            s_members, s_vectors, s_primary = ranked[source]
            sim, source_primary, source_id = blocks.cross_partial(
                t_vectors, t_primary, t_members.ids, s_vectors, s_primary, s_members.ids,
                device=self._config.device)
            yield beam.pvalue.TaggedOutput(self.PARTIALS, ((cluster, nb, target), BlockPartial(
                None, sim, source_primary, source_id)))


class CombineBlockPartialsFn(beam.CombineFn):
    """Per member, the best of its block's partials: order-free, so runners may combine
    partials before the shuffle and a key never holds more than one block's arrays."""

    def create_accumulator(self):
        return None

    def add_input(self, accumulator, partial):
        return partial if accumulator is None else accumulator.merged(partial)

    def merge_accumulators(self, accumulators):
        result = None
        for acc in accumulators:
            if acc is not None:
                result = acc if result is None else result.merged(acc)
        return result

    def extract_output(self, accumulator):
        return accumulator


def _block_decisions(element, eps: float):
    (cluster, nb, block), partial = element
    has = partial.sim > -np.inf
    return _cluster_file(cluster, nb, block), _decide(
        cluster, partial.members, partial.sim, has, list(partial.source_id), eps)


# ---- --border_margin: a point in two clusters gets one answer ------------------------------

def merge_memberships(rows) -> tuple:
    """A border point's memberships -> one row: a duplicate if either membership says so.

    rows: (cluster, border, id, cos, l2, max_id, sim, dup) per membership.
    """
    rows = sorted(rows, key=lambda r: (r[1], r[0]))   # the home membership first
    home, dups = rows[0], [r for r in rows if r[7]]
    best = max(dups or rows, key=lambda r: r[6])
    return home[:5] + (best[5], best[6], bool(dups))


def _membership_rows(element):
    _, decisions = element
    m = decisions.members
    for k, (id_, max_id, sim, dup) in enumerate(decisions.rows()):
        yield id_, (decisions.cluster, bool(m.border[k]), id_, float(m.cos_dist[k]),
                    float(m.l2_dist[k]), max_id, sim, dup)


def _home_file(row, sizes: dict, block_rows: int) -> tuple:
    cluster = row[0]
    nb = blocks.n_blocks(sizes[cluster], block_rows)
    block = int(blocks.block_of([row[2]], nb, cluster)[0])
    return _cluster_file(cluster, nb, block), row


def _decisions_from_rows(element):
    key, rows = element
    rows = sorted(rows, key=lambda r: r[2])
    members = Members(ids=tuple(r[2] for r in rows),
                      cos_dist=np.array([r[3] for r in rows], np.float32),
                      l2_dist=np.array([r[4] for r in rows], np.float32),
                      border=np.zeros(len(rows), bool))
    return key, Decisions(
        rows[0][0], members, tuple(r[5] for r in rows), np.array([r[6] for r in rows], np.float32),
        np.array([r[7] for r in rows], bool))


# ---- writers ----------------------------------------------------------------------------

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


def write_exact_outputs(element, dedup_dir: str):
    """(chunk, [ExactDuplicate]) -> pairwise rows (max_id = survivor, score 1.0) and removal
    ids, one file per chunk that holds copies."""
    chunk, exact = element
    exact = sorted(exact)
    ids = [e.id for e in exact]
    name = f"exact-{chunk}.parquet"
    yield write_parquet(FileSystems.join(dedup_dir, "pairwise_results", name), pa.table({
        "id": ids, "max_id": [e.survivor for e in exact],
        "cosine_sim_score": pa.array([1.0] * len(ids), pa.float32())}, schema=PAIRWISE_SCHEMA))
    yield write_parquet(FileSystems.join(dedup_dir, "duplicates", name),
                        pa.table({"id": ids}, schema=DUPLICATES_SCHEMA))


# ---- the transforms ---------------------------------------------------------------------

class _SizeStats(beam.CombineFn):
    """(clusters, largest, clusters cut into blocks) from the cluster sizes."""

    def __init__(self, block_rows: int):
        self._block_rows = block_rows

    def create_accumulator(self):
        return (0, 0, 0)

    def add_input(self, acc, size):
        return (acc[0] + 1, max(acc[1], size), acc[2] + (size > self._block_rows))

    def merge_accumulators(self, accs):
        accs = list(accs)
        return (sum(a[0] for a in accs), max(a[1] for a in accs), sum(a[2] for a in accs))

    def extract_output(self, acc):
        return {"clusters_with_members": acc[0], "largest_cluster": acc[1],
                "clusters_split_into_blocks": acc[2]}


@dataclasses.dataclass
class DedupOutputs:
    decisions: beam.PCollection  # Decisions per cluster (or block); exact copies not in them
    exact: beam.PCollection      # ExactDuplicate
    written: beam.PCollection    # one count: dedup/ is written and the staging is gone
    info: beam.PCollection       # one dict: the plan and the cluster sizes (summary.json)


def _count_done(pcoll, label: str):
    return beam.pvalue.AsSingleton(pcoll | label >> beam.combiners.Count.Globally())


class SemanticDedupCore(beam.PTransform):
    """Chunks of embeddings -> DedupOutputs, writing OUTPUT/dedup/."""

    def __init__(self, config: DedupConfig, dim: int, has_hash: bool):
        super().__init__()
        self._config = config
        self._dim = dim
        self._has_hash = has_hash

    def expand(self, chunks):
        config, p, dim = self._config, chunks.pipeline, self._dim

        # Exact pre-pass: identical bytes -> the smallest id survives; the copies reach the
        # chunk they were read from by a join on its name.
        if self._has_hash:
            exact = (chunks
                     | "HashPairs" >> beam.ParDo(HashPairsFn(config))
                     | "GroupByHash" >> beam.GroupByKey()
                     | "ExactDuplicates" >> beam.FlatMap(_exact_duplicates))
        else:
            exact = p | "NoHashes" >> beam.Create([])
        chunks = ({"chunk": chunks | "ByName" >> beam.Map(lambda c: (c.name, c)),
                   "excluded": exact | "CopyByChunk" >> beam.Map(lambda e: (e.chunk, e.id))}
                  | "JoinCopiesToChunks" >> beam.CoGroupByKey()
                  | "WithExclusions" >> beam.Map(_with_exclusions))

        n_candidates = (chunks
                        | "ChunkSizes" >> beam.Map(count_candidates, config)
                        | "CountCandidates" >> beam.CombineGlobally(sum))
        plan = n_candidates | "Plan" >> beam.Map(make_plan, config)
        if config.centroids_path:
            path = config.centroids_path
            centroids = (p | "CentroidsPath" >> beam.Create([path])
                         | "LoadCentroids" >> beam.Map(lambda f: km.load_centroids(f, dim or None)))
        else:
            centroids = (chunks
                         | "SampleForKMeans" >> beam.ParDo(SampleForTrainingFn(config),
                                                           beam.pvalue.AsSingleton(plan))
                         # bounded by the plan: ~64 rows per centroid, never by N
                         | "GatherSample" >> beam.combiners.ToList()
                         | "TrainKMeans" >> beam.Map(train_centroids, config,
                                                     beam.pvalue.AsSingleton(plan)))
        centroids_written = centroids | "WriteCentroids" >> beam.Map(
            _write_centroids, FileSystems.join(config.dedup_dir, "centroids.npy"))

        assigned = chunks | "Assign" >> beam.ParDo(AssignFn(config),
                                                   beam.pvalue.AsSingleton(centroids))
        sizes = (assigned
                 | "ClusterCounts" >> beam.FlatMap(lambda a: a.cluster_counts())
                 | "ClusterSizes" >> beam.CombinePerKey(sum))
        sizes_dict = beam.pvalue.AsDict(sizes)   # O(k)
        pairwise = (assigned
                    | "Route" >> beam.ParDo(RouteFn(config), sizes_dict)
                    | "GroupByClusterBlocks" >> beam.GroupByKey()
                    | "Pairwise" >> beam.ParDo(PairwiseFn(config, dim)).with_outputs(
                        PairwiseFn.PARTIALS, main="decisions"))
        eps = config.eps
        block_results = (pairwise[PairwiseFn.PARTIALS]
                         | "CombinePartials" >> beam.CombinePerKey(CombineBlockPartialsFn())
                         | "BlockDecisions" >> beam.Map(_block_decisions, eps))
        # Each element: (file key, Decisions of one cluster or one block of it).
        decisions = (pairwise.decisions, block_results) | "AllDecisions" >> beam.Flatten()
        if config.border_margin is not None:
            decisions = (decisions
                         | "Memberships" >> beam.FlatMap(_membership_rows)
                         | "GroupMemberships" >> beam.GroupByKey()
                         | "MergeMemberships" >> beam.MapTuple(
                             lambda _, rows: merge_memberships(rows))
                         | "ByHomeFile" >> beam.Map(_home_file, sizes_dict, config.block_rows)
                         | "GroupByHomeFile" >> beam.GroupByKey()
                         | "AsDecisions" >> beam.Map(_decisions_from_rows))
        # Outputs are written where the decisions are made: no further shuffle of rows.
        written_decisions = decisions | "WriteClusterOutputs" >> beam.ParDo(
            WriteClusterOutputsFn(config.dedup_dir))
        exact_written = (exact
                         | "ExactByChunk" >> beam.Map(lambda e: (e.chunk, e))
                         | "GroupExactByChunk" >> beam.GroupByKey()
                         | "WriteExact" >> beam.FlatMap(write_exact_outputs, config.dedup_dir))
        written = _cleanup_after(config, [centroids_written, written_decisions, exact_written])

        k = centroids | "K" >> beam.Map(lambda c: int(c.shape[0]) if c.size else 0)
        stats = (sizes
                 | "SizeValues" >> beam.Values()
                 | "SizeStats" >> beam.CombineGlobally(_SizeStats(config.block_rows)))
        info = (plan
                | "Info" >> beam.Map(
                    lambda pl, k_, st, rows: dict(pl.as_dict(), n_clusters=k_,
                                                  pairwise_block_size=rows, **st),
                    beam.pvalue.AsSingleton(k), beam.pvalue.AsSingleton(stats),
                    config.block_rows))
        return DedupOutputs(decisions=decisions | "Decisions" >> beam.Values(), exact=exact,
                            written=written, info=info)


def _cleanup_after(config: DedupConfig, written: list):
    """Delete dedup/_staging once every dedup output is written (side inputs order it)."""
    staging = config.staging_dir

    def cleanup(_, *done):
        if FileSystems.exists(staging):
            FileSystems.delete([staging])
        return 1

    p = written[0].pipeline
    return (p
            | "CleanupOnce" >> beam.Create([None])
            | "DeleteStaging" >> beam.Map(cleanup, *[_count_done(w, f"Written{i}")
                                                     for i, w in enumerate(written)]))


def decision_rows(decisions: Decisions):
    """(shard, ("semantic", id, cluster, max_id, sim, dup)) per member, for `run`'s join."""
    n_dups = int(np.count_nonzero(decisions.is_duplicate))   # counters for the live progress line
    beam.metrics.Metrics.counter("curator", "semantic_duplicates").inc(n_dups)
    beam.metrics.Metrics.counter("curator", "kept").inc(len(decisions.is_duplicate) - n_dups)
    for id_, max_id, sim, dup in decisions.rows():
        yield shard_of_id(id_), ("semantic", id_, decisions.cluster, max_id, sim, dup)


def _results_of_shard(element):
    """One shard's candidates joined with their dedup answers -> SampleResult each."""
    shard, grouped = element
    infos = {info.id: info for info in grouped["info"]}
    answered = 0
    for row in grouped["answer"]:
        answered += 1
        info = infos.pop(row[1])
        if row[0] == "exact":
            yield SampleResult(info=info, status=EXACT_DUPLICATE, duplicate_of=row[2],
                               cosine_sim=1.0)
        else:
            _, _, cluster, max_id, sim, dup = row
            yield SampleResult(info=info, status=SEMANTIC_DUPLICATE if dup else KEPT,
                               cluster=cluster, duplicate_of=max_id if dup else None,
                               cosine_sim=sim)
    if infos:   # a bug, never a silent loss: the accounting check would fail anyway
        raise RuntimeError(f"dedup gave no answer for {len(infos)} candidate(s) of shard "
                           f"{shard}, e.g. {sorted(infos)[0]}")


class Deduplicate(beam.PTransform):
    """`run`'s dedup: the candidates' SampleInfo and the embeddings files `run` has written
    -> SampleResult per candidate (kept / exact_duplicate / semantic_duplicate).

    Dedup reads the vectors from the written embeddings (passed_filters = true), so they
    are never staged or shuffled a second time; answers reach their samples by a join on the
    shard. Returns DedupOutputs with `decisions` replaced by the SampleResults.
    """

    def __init__(self, config: DedupConfig, dim: int, embeddings_written):
        super().__init__()
        self._config = config
        self._dim = dim
        self._embeddings_written = embeddings_written

    def expand(self, candidates):
        dim = self._dim
        chunks = (self._embeddings_written
                  | "RowGroups" >> beam.FlatMap(
                      lambda path: row_group_chunks(path, chunk_names([path])[path], dim)))
        core = chunks | "SemDeDup" >> SemanticDedupCore(self._config, dim, has_hash=True)
        answers = ((core.decisions | "DecisionRows" >> beam.FlatMap(decision_rows),
                    core.exact | "ExactRows" >> beam.Map(
                        lambda e: (shard_of_id(e.id), ("exact", e.id, e.survivor))))
                   | "AllAnswers" >> beam.Flatten())
        results = ({"info": candidates | "InfoByShard" >> beam.Map(lambda i: (i.shard, i)),
                    "answer": answers}
                   | "JoinAnswersToShard" >> beam.CoGroupByKey()
                   | "Results" >> beam.FlatMap(_results_of_shard))
        return dataclasses.replace(core, decisions=results)


# ---- the `dedup` command: from an embeddings parquet --------------------------------------

class DedupFromEmbeddings(beam.PTransform):
    """Step 2 of the three-step flow: embeddings -> OUTPUT/dedup/ + summary.json.

    `paths`: parquet files (an id and a list<float32> embedding column); `npy_pairs`:
    clip-retrieval's (img_emb_N.npy, metadata_N.parquet) pairs, read as they are.
    """

    def __init__(self, paths: List[str], config: DedupConfig,
                 recorded_options: Optional[dict] = None, claim_token: Optional[str] = None,
                 npy_pairs: Tuple[Tuple[str, str], ...] = ()):
        super().__init__()
        self._paths = sorted(paths)
        self._npy_pairs = sorted(npy_pairs)
        self._config = config
        self._recorded = recorded_options
        self._claim_token = claim_token

    def _dim_and_hash(self) -> Tuple[int, bool]:
        dim, has_hash = 0, not self._npy_pairs   # clip-retrieval writes no content hash
        for npy, _ in self._npy_pairs[:1]:
            dim = npy_shape(npy)[1]
        for path in self._paths:   # the dim from the first file with a row
            file_dim, file_hash = embeddings_schema(path, self._config)
            has_hash = has_hash and file_hash
            if file_dim:
                dim = dim or file_dim
                break
        return dim, has_hash

    def expand(self, pbegin):
        config = self._config
        dim, has_hash = self._dim_and_hash()
        if config.transport == SHUFFLE:
            _LOG.info("dedup: vectors travel through the shuffle as float32 bytes")
        names = chunk_names(self._paths + [npy for npy, _ in self._npy_pairs])
        sources = [("parquet", p, None, names[p], None) for p in self._paths]
        if self._npy_pairs:
            id_column = npy_id_column(self._npy_pairs[0][1], config.id_column)
            _LOG.info("dedup: clip-retrieval layout, %d img_emb files, ids from column %r",
                      len(self._npy_pairs), id_column)
            sources += [("npy", npy, meta, names[npy], id_column)
                        for npy, meta in self._npy_pairs]
        chunks = (pbegin
                  | "Files" >> beam.Create(sources)
                  | "OneFilePerWorkItem" >> beam.Reshuffle()
                  | "Chunks" >> beam.FlatMap(_source_chunks, dim))
        core = chunks | "SemDeDup" >> SemanticDedupCore(config, dim, has_hash)
        n_exact = core.exact | "CountExact" >> beam.combiners.Count.Globally()
        counts = (core.decisions
                  | "DecisionCounts" >> beam.Map(
                      lambda d: (len(d), int(d.is_duplicate.sum())))
                  | "SumCounts" >> beam.CombineGlobally(sum_pairs))
        summary = {"command": "dedup", "options": self._recorded, "eps": config.eps,
                   "which_to_keep": config.which_to_keep}
        return (pbegin
                | "SummaryOnce" >> beam.Create([None])
                | "WriteDedupSummary" >> beam.Map(
                    _write_dedup_summary, config, summary, self._claim_token,
                    beam.pvalue.AsSingleton(n_exact), beam.pvalue.AsSingleton(counts),
                    beam.pvalue.AsSingleton(core.info), beam.pvalue.AsSingleton(core.written)))


def _source_chunks(source, dim: int) -> List[Chunk]:
    kind, path, metadata, name, id_column = source
    if kind == "npy":
        return npy_chunks(path, metadata, name, id_column)
    return row_group_chunks(path, name, dim)


def _write_dedup_summary(_, config, summary, claim_token, n_exact, counts, info, done):
    from beam_curator.ownership import finish_output

    n_semantic, n_semantic_dups = counts
    summary = dict(summary,
                   n_embeddings=n_exact + n_semantic,
                   n_duplicates=n_exact + n_semantic_dups,
                   n_exact_duplicates=n_exact,
                   n_clusters=info["n_clusters"],
                   dedup=info)
    return finish_output(config.output, summary, claim_token)
