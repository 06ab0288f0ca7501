"""The semantic dedup core in Beam: exact pre-pass, centroids as a side input, a GroupByKey
per bin of whole clusters (or per block pair of a large cluster), SemDeDup's keep rule.

    embeddings ─► chunks (parquet row groups or .npy rows: references; vectors are read where
      │           needed)
      ├─► row check: each chunk decoded once (and staged): wrong-length rows fail the run,
      │   null / NaN / zero rows are counted and left out, non-unit rows normalised
      ├─► (dedup command) repeated ids: CombinePerKey(id) -> the run fails naming both places
      ├─► exact pre-pass: GroupByKey(content hash), the smallest id survives; the copies
      │   reach their chunk by a keyed join (never a broadcast)
      ├─► plan: candidates counted by a combiner -> n_clusters (~1 per 10,000 when not given)
      │   and the k-means sample (sized by k) -> centroids: LoadCentroids | TrainCentroids
      ├─► Assign(AsSingleton(centroids)) -> cluster sizes (a combiner: O(k)); the staged
      │   transport stages the chunk's vectors in cluster order here
      └─► Route: clusters of n <= block_rows members are packed into bins of at most
          min(blocks.BIN_ROWS, block_rows) members, one key each; a larger cluster is cut into
          ceil(n / block_rows) hash blocks and every block pair {a, b} is its own key
          -> GroupByKey -> pairwise -> (block pairs: partials combined per block, exactly)
          -> kmeans/, pairwise_results/, duplicates/, centroids.npy (dedup_outputs.py)

No step holds more than O(k) (centroids, cluster sizes) or one key's members (at most about
2 x block_rows) in one process. Vectors cross a shuffle at most once: `staged` (one machine)
moves (file, row) references through the GroupByKey and reads the rows from raw files under
`dedup/_staging/`; `shuffle` moves float32 arrays once. A member of a cluster cut into nb
blocks takes part in nb block pairs (the price of spreading one cluster over workers; at the
default sizes most clusters are one block).

The pure algorithms live in `beam_curator.dedup`; the elements moved here and their I/O in
`transforms/dedup_data.py`; the public transforms around this core in `transforms/dedup.py`.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import zlib
from typing import Callable, Dict, List, NamedTuple, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems

from beam_curator.dedup import blocks
from beam_curator.dedup import kmeans as km
from beam_curator.dedup.assign import (
    assign_to_centroids,
    assign_with_runner_up,
    border_assignments,
)
from beam_curator.dedup.pairwise import is_duplicate, max_sim_to_earlier
from beam_curator.transforms.dedup_data import (
    Assigned,
    BlockPartial,
    Chunk,
    Decisions,
    ExactDuplicate,
    InvalidRow,
    Members,
    count_candidates,
    discard,
    read_sample,
    without_vectors,
    write_sample,
    write_staged,
)
from beam_curator.transforms.dedup_outputs import (
    WriteClusterOutputsFn,
    write_exact_outputs,
)
from beam_curator.transforms.dedup_plan import (
    SHUFFLE,
    STAGED,
    DedupConfig,
    DedupPlan,
    make_plan,
)
from beam_curator.transforms.write_behind import WriteBehindDoFn

_LOG = logging.getLogger(__name__)


# ---- the rows: checked once, ids unique ---------------------------------------------------

class CheckRowsFn(WriteBehindDoFn):
    """Chunk -> the chunk with its invalid rows `dropped`; each InvalidRow to INVALID and the
    number of rows normalised to NORMALIZED. The first step that reads the vectors: in the
    staged transport it stages the valid ones (written behind), so no later step decodes."""

    INVALID, NORMALIZED, ROWS = "invalid", "normalized", "rows"

    def __init__(self, config: DedupConfig):
        self._config = config

    def process(self, chunk: Chunk):
        decoded = chunk.decode(self._config)
        for row in decoded.invalid_rows():
            yield beam.pvalue.TaggedOutput(self.INVALID, row)
        if decoded.normalized:
            yield beam.pvalue.TaggedOutput(self.NORMALIZED, decoded.normalized)
        chunk = dataclasses.replace(
            chunk, dropped=tuple(np.flatnonzero(decoded.reasons).tolist()))
        yield beam.pvalue.TaggedOutput(self.ROWS, len(decoded.ids) - len(chunk.dropped))
        staged = chunk.staged_copy(self._config)
        if staged and len(chunk.dropped) < len(decoded.ids):   # nothing to stage: reads decode
            self._writes.submit(write_staged, staged, decoded.without(chunk.dropped)[1])
        yield chunk


class InvalidSummary(beam.CombineFn):
    """InvalidRow -> {count, by reason, up to MAX_EXAMPLES examples (the first by file and
    row)}: what summary.json says about the rows dedup could not use."""

    MAX_EXAMPLES = 20

    def create_accumulator(self):
        return {}, []

    def add_input(self, acc, row: InvalidRow):
        counts, examples = acc
        counts[row.reason] = counts.get(row.reason, 0) + 1
        return counts, self._first(examples + [row])

    def merge_accumulators(self, accs):
        counts, examples = {}, []
        for part_counts, part_examples in accs:
            for reason, n in part_counts.items():
                counts[reason] = counts.get(reason, 0) + n
            examples = self._first(examples + part_examples)
        return counts, examples

    def _first(self, rows):
        return sorted(rows, key=lambda r: (r.file, r.row))[:self.MAX_EXAMPLES]

    def extract_output(self, acc):
        counts, examples = acc
        return {"count": sum(counts.values()), "by_reason": dict(sorted(counts.items())),
                "examples": [r._asdict() for r in examples]}


def _input_checks(invalid: dict, normalized: int) -> dict:
    """summary.json's word on the input rows (and the log's, where some were not fine)."""
    if invalid["count"]:
        first = invalid["examples"][0]
        _LOG.warning("dedup: %d embedding row(s) left out (%s), e.g. %s row %d (id %r): "
                     "see summary.json dedup.input_checks", invalid["count"],
                     ", ".join(f"{n} {reason}" for reason, n in invalid["by_reason"].items()),
                     first["file"], first["row"], first["id"])
    if normalized:
        _LOG.warning("dedup: %d embedding(s) were not unit length and were normalised (cosine "
                     "similarity assumes unit vectors)", normalized)
    return {"invalid_rows": invalid, "normalized_rows": normalized}


# The repeated-id check groups ids by a hash bucket, packed per (chunk, bucket): elements
# and keys grow with chunks x buckets, not with ids, and one key holds about this many ids.
IDS_PER_BUCKET = 500_000


def id_buckets(n_ids: int) -> int:
    return max(1, -(-n_ids // IDS_PER_BUCKET))


class IdBucketsFn(beam.DoFn):
    """Chunk -> (bucket, (file, ids, rows in the file)) for each hash bucket its candidate
    ids fall in: where each id was read, packed."""

    def __init__(self, config: DedupConfig):
        self._config = config

    def process(self, chunk: Chunk, n_ids: int):
        buckets = id_buckets(n_ids)
        file = chunk.npy.npy if chunk.npy is not None else chunk.parquet[0]
        packs: Dict[int, Tuple[List[str], List[int]]] = {}
        for id_, (_, row) in chunk.places(self._config):
            bucket = zlib.crc32(id_.encode("utf-8")) % buckets
            ids, rows = packs.setdefault(bucket, ([], []))
            ids.append(id_)
            rows.append(row)
        for bucket, (ids, rows) in packs.items():
            yield bucket, (file, ids, rows)


def repeats_in_bucket(bucket_and_packs):
    """(bucket, packs) -> (id, (times seen, its first two places)) for each id of the bucket
    read more than once."""
    _, packs = bucket_and_packs
    first: Dict[str, Tuple[str, int]] = {}
    again: Dict[str, list] = {}
    for file, ids, rows in packs:
        for id_, row in zip(ids, rows):
            if id_ in first:
                again.setdefault(id_, [first[id_]]).append((file, row))
            else:
                first[id_] = (file, row)
    for id_, places in sorted(again.items()):
        places = sorted(places)
        yield id_, (len(places), tuple(places[:2]))


class RepeatsFn(beam.CombineFn):
    """(id, (times, places)) of repeated ids -> (how many ids, the first MAX_SHOWN)."""

    MAX_SHOWN = 3

    def create_accumulator(self):
        return 0, []

    def add_input(self, acc, repeat):
        return acc[0] + 1, sorted(acc[1] + [repeat])[:self.MAX_SHOWN]

    def merge_accumulators(self, accs):
        n, shown = 0, []
        for part_n, part_shown in accs:
            n, shown = n + part_n, sorted(shown + part_shown)[:self.MAX_SHOWN]
        return n, shown

    def extract_output(self, acc):
        return acc


def refuse_repeated_ids(repeats) -> int:
    """Fails the run when an id was read twice: one id must have one answer, and a row
    compared with its own copy would be its own duplicate. Returns 0 (nothing repeated)."""
    from beam_curator.errors import OptionError

    n, shown = repeats
    if not n:
        return 0
    id_, (times, ((file_a, row_a), (file_b, row_b))) = shown[0]
    raise OptionError(
        f"{n} id(s) appear more than once in --embeddings, e.g. {id_!r} ({times} times) at "
        f"{file_a} row {row_a} and at {file_b} row {row_b}: each sample needs one embedding. "
        "Leave out the copies (the same file under two names is read once), or give the "
        "rows distinct ids.")


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
    """Chunk -> the path of a small file holding its training-sample rows (ids + vectors),
    read from the chunk's staged copy (the row check wrote it) or decoded.

    Only the path travels to the trainer. Shipping the rows themselves made one record of
    every bundle's sample (Beam lifts the gathering combine into the SDK): ~100 MB at 1M rows,
    which Flink's batch sort refused ("Record too large"), and O(k) bytes per record at scale.
    """

    def __init__(self, config: DedupConfig):
        self._config = config

    def process(self, chunk: Chunk, plan: DedupPlan):
        ids, vectors = chunk.load(self._config)
        fraction = km.sample_fraction(plan.n_candidates, plan.sample_size)
        rows = [r for r in np.flatnonzero(km.sample_mask(ids, fraction, self._config.seed))
                if ids[r] not in chunk.excluded]
        if rows:
            path = FileSystems.join(self._config.staging_dir, f"sample-{chunk.name}.npz")
            yield write_sample(path, [ids[r] for r in rows], vectors[rows])


# Sample files are read in parallel: at 1B rows the trainer opens ~100k small remote files.
_SAMPLE_READERS = 16


def train_centroids(sample_files: List[str], config: DedupConfig,
                    plan: DedupPlan) -> np.ndarray:
    """Sorted by id first, so every runner and chunking trains on the same matrix."""
    with concurrent.futures.ThreadPoolExecutor(_SAMPLE_READERS) as pool:
        parts = list(pool.map(read_sample, sorted(sample_files)))
    ids = [i for part_ids, _ in parts for i in part_ids]
    if not ids:
        return np.zeros((0, 0), dtype=np.float32)
    vectors = np.concatenate([v for _, v in parts])[np.argsort(np.array(ids), kind="stable")]
    del parts
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

class AssignFn(WriteBehindDoFn):
    """Chunk -> Assigned: each candidate's nearest centroid (and runner-up with a margin).
    The cluster-order copy (read by the pairwise step) is written behind, during the next
    chunk's assignment."""

    def __init__(self, config: DedupConfig):
        self._config = config
        self.assigned = beam.metrics.Metrics.counter("curator", "dedup_assigned")

    def process(self, chunk: Chunk, centroids: np.ndarray):
        ids, vectors = chunk.load(self._config)
        keep = np.array([r for r, i in enumerate(ids) if i not in chunk.excluded],
                        dtype=np.int64)
        if not keep.size or centroids.size == 0:
            return
        if keep.size < len(ids):   # exact copies out; else no copy of the chunk's vectors
            vectors = vectors[keep]
        with_border = self._config.border_margin is not None and centroids.shape[0] > 1
        if with_border:   # one similarity pass gives the nearest and the runner-up
            labels, cos_dist, l2_dist, labels2, dists2 = assign_with_runner_up(
                vectors, centroids, device=self._config.device)
        else:
            labels, cos_dist, l2_dist = assign_to_centroids(vectors, centroids,
                                                            device=self._config.device)
        paths, path_index, rows = (), None, keep
        if self._config.transport == STAGED:
            paths, rows = _stage_by_cluster(chunk, self._config, vectors, labels,
                                            self._writes.submit)
            path_index = np.zeros(keep.size, dtype=np.int32)
        members = Members(
            ids=tuple(ids[r] for r in keep), cos_dist=cos_dist, l2_dist=l2_dist,
            border=np.zeros(keep.size, dtype=bool), dim=chunk.dim,
            paths=paths, path_index=path_index, rows=rows)
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


def _stage_by_cluster(chunk: Chunk, config: DedupConfig, vectors: np.ndarray,
                      labels: np.ndarray, write_with: Callable):
    """Writes (through `write_with`) the candidates' vectors sorted by cluster and drops the
    chunk's first staged copy; returns (the file, each candidate's row in it). The pairwise
    step then reads the members of one (chunk, bin) as one run of rows, not one read per
    scattered row."""
    order = np.argsort(labels, kind="stable")
    path = chunk.staged_by_cluster(config)
    write_with(_restage, path, vectors, order, chunk.staged_copy(config))
    rows = np.empty(order.size, dtype=np.int64)
    rows[order] = np.arange(order.size)
    return (path,), rows


def _restage(path: str, vectors: np.ndarray, order: np.ndarray, first_copy: str) -> None:
    write_staged(path, vectors, order)
    discard(first_copy)   # nothing reads it again; a retry decodes the chunk


class RouteFn(beam.DoFn):
    """Assigned -> (key, (block, Members)). Clusters of at most block_rows members are packed
    into bins (`blocks.pack_clusters`): key (bin's first cluster, 1, 0, 0), one element per
    bin carrying its members' clusters. A larger cluster is cut into nb blocks and every
    block pair is a key (cluster, nb, lo, hi); each of its members goes to nb of them."""

    def __init__(self, config: DedupConfig):
        self._config = config
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
            self._bins = blocks.pack_clusters(sizes, self._config.block_rows)
            self._bins_from = sizes
        return self._bins

    def process(self, assigned: Assigned, sizes: dict):
        bin_of = self._bin_of(sizes)
        members = assigned.members
        if self._config.transport == SHUFFLE:   # vectors travel inline: read them once more
            _, vectors = assigned.chunk.load(self._config)
            if members.rows.size < len(vectors):   # exact copies out (rows ascend), else as is
                vectors = vectors[members.rows]
            members = dataclasses.replace(members, vectors=vectors, paths=(),
                                          path_index=None, rows=None)
        for clusters, index, border in assigned.memberships:
            binned = {}
            for cluster, rows in blocks.positions_by_cluster(clusters):
                nb = blocks.n_blocks(sizes[cluster], self._config.block_rows)
                if nb == 1:
                    binned.setdefault(bin_of[cluster], []).append((cluster, rows))
                    continue
                group = _flagged(members.take(index[rows]), border)
                block = blocks.block_of(group.ids, nb, cluster)
                for b in np.unique(block).tolist():
                    part = group.take(np.flatnonzero(block == b))
                    for lo, hi in blocks.pair_keys(b, nb):
                        self._count(part)
                        yield (cluster, nb, lo, hi), (b, part)
            for first, parts in binned.items():
                rows = np.concatenate([r for _, r in parts])
                group = dataclasses.replace(
                    _flagged(members.take(index[rows]), border),
                    cluster=np.repeat(np.array([c for c, _ in parts], dtype=np.int64),
                                      [r.size for _, r in parts]))
                self._count(group)
                yield (first, 1, 0, 0), (0, group)


def _flagged(group: Members, border: bool) -> Members:
    """A second membership's members carry border=True (their home is another cluster)."""
    if not border:
        return group
    return dataclasses.replace(group, border=np.ones(len(group), dtype=bool))


def _cluster_file(cluster: int, nb: int = 1, block: int = 0) -> str:
    return f"cluster-{cluster:06d}" if nb == 1 else f"cluster-{cluster:06d}-block-{block:04d}"


def _rank_sorted(cluster: int, members: Members, config: DedupConfig):
    """(members in rank order with vectors, their vectors, their primary rank keys)."""
    primary = blocks.rank_primary(members.ids, members.cos_dist, config.which_to_keep,
                                  config.seed, cluster)
    order = blocks.rank_order(members.ids, primary)
    ranked = members.take(order)
    return ranked, ranked.load_vectors(), primary[order]


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

    def __init__(self, config: DedupConfig):
        self._config = config
        self.key_rows = beam.metrics.Metrics.distribution("curator", "dedup_rows_per_key")
        self.similarities = beam.metrics.Metrics.counter("curator",
                                                         "dedup_pairwise_similarities")

    def process(self, element):
        (cluster, nb, lo, hi), parts = element
        if nb == 1:
            yield from self._whole_clusters(parts)
            return
        by_block = {}
        for b, members in parts:
            by_block.setdefault(b, []).append(members)
        ranked = {b: _rank_sorted(cluster, Members.concat(ms), self._config)
                  for b, ms in by_block.items()}
        sizes = [len(r[0]) for r in ranked.values()]
        self.key_rows.update(sum(sizes))
        # similarities computed: n(n-1)/2 on a diagonal, n_a x n_b between two blocks
        self.similarities.inc(sizes[0] * (sizes[0] - 1) // 2 if len(sizes) == 1 else
                              sizes[0] * sizes[1])
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


    def _whole_clusters(self, parts):
        """A bin: each of its clusters in one pass, as `max_sim_to_earlier` defines it."""
        members = Members.concat([m for _, m in parts]).with_vectors()   # reads in runs
        self.key_rows.update(len(members))
        for cluster, group in members.by_cluster():
            ranked, vectors, _ = _rank_sorted(cluster, group, self._config)
            self.similarities.inc(len(ranked) * (len(ranked) - 1) // 2)
            max_sim, argmax = max_sim_to_earlier(vectors, device=self._config.device)
            max_ids = [ranked.ids[a] if a >= 0 else None for a in argmax.tolist()]
            yield _cluster_file(cluster), _decide(cluster, ranked, max_sim, argmax >= 0,
                                                  max_ids, self._config.eps)


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


def merge_memberships(rows) -> Membership:
    """A border point's memberships -> one: a duplicate if either membership says so."""
    rows = sorted(rows, key=lambda r: (r.border, r.cluster))   # the home membership first
    home, dups = rows[0], [r for r in rows if r.duplicate]
    best = max(dups or rows, key=lambda r: r.sim)
    return home._replace(max_id=best.max_id, sim=best.sim, duplicate=bool(dups))


def _memberships(element):
    _, decisions = element
    m = decisions.members
    for k, (id_, max_id, sim, dup) in enumerate(decisions.rows()):
        yield id_, Membership(decisions.cluster, bool(m.border[k]), id_, float(m.cos_dist[k]),
                              float(m.l2_dist[k]), max_id, sim, dup)


def _home_file(row: Membership, sizes: dict, block_rows: int) -> tuple:
    nb = blocks.n_blocks(sizes[row.cluster], block_rows)
    block = int(blocks.block_of([row.id], nb, row.cluster)[0])
    return _cluster_file(row.cluster, nb, block), row


def _decisions_from_memberships(element):
    key, rows = element
    rows = sorted(rows, key=lambda r: r.id)
    members = Members(ids=tuple(r.id for r in rows),
                      cos_dist=np.array([r.cos_dist for r in rows], np.float32),
                      l2_dist=np.array([r.l2_dist for r in rows], np.float32),
                      border=np.zeros(len(rows), bool))
    return key, Decisions(
        rows[0].cluster, members, tuple(r.max_id for r in rows),
        np.array([r.sim for r in rows], np.float32), np.array([r.duplicate for r in rows], bool))


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


class CoreOutputs(NamedTuple):
    decisions: beam.PCollection  # Decisions per cluster (or block); exact copies not in them
    exact: beam.PCollection      # ExactDuplicate
    written: beam.PCollection    # one count: dedup/ is written and the staging is gone
    info: beam.PCollection       # one dict: the plan, the cluster sizes, the input checks
    invalid: beam.PCollection    # InvalidRow: rows left out (no answer in `decisions`)


def _count_done(pcoll, label: str):
    return beam.pvalue.AsSingleton(pcoll | label >> beam.combiners.Count.Globally())


class SemanticDedupCore(beam.PTransform):
    """Chunks of embeddings -> CoreOutputs, writing OUTPUT/dedup/.

    `check_ids`: refuse an id read twice (a keyed pass over every id, before any other work);
    off where the ids are unique by construction (`run`: shard name / key)."""

    def __init__(self, config: DedupConfig, has_hash: bool, check_ids: bool = False):
        super().__init__()
        self._config = config
        self._has_hash = has_hash
        self._check_ids = check_ids

    def expand(self, chunks):
        config, p = self._config, chunks.pipeline

        checked = chunks | "CheckRows" >> beam.ParDo(CheckRowsFn(config)).with_outputs(
            CheckRowsFn.INVALID, CheckRowsFn.NORMALIZED, CheckRowsFn.ROWS, main="chunks")
        chunks = checked.chunks
        if self._check_ids:
            n_ids = (checked[CheckRowsFn.ROWS]
                     | "CountRows" >> beam.CombineGlobally(sum).without_defaults())
            repeats = (chunks
                       | "IdBuckets" >> beam.ParDo(IdBucketsFn(config),
                                                   beam.pvalue.AsSingleton(n_ids, default_value=0))
                       | "GroupByIdBucket" >> beam.GroupByKey()
                       | "RepeatedIds" >> beam.FlatMap(repeats_in_bucket)
                       | "CountRepeats" >> beam.CombineGlobally(RepeatsFn())
                       | "RefuseRepeatedIds" >> beam.Map(refuse_repeated_ids))
            # Every later step waits for the check: a failed one costs no k-means.
            chunks = chunks | "AfterIdCheck" >> beam.Map(lambda c, _: c,
                                                         beam.pvalue.AsSingleton(repeats))

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
                         | "LoadCentroids" >> beam.Map(km.load_centroids))
        else:
            centroids = (chunks
                         | "SampleForKMeans" >> beam.ParDo(SampleForTrainingFn(config),
                                                           beam.pvalue.AsSingleton(plan))
                         # one path per chunk; the rows (~64 per centroid) stay in files
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
                    | "Pairwise" >> beam.ParDo(PairwiseFn(config)).with_outputs(
                        PairwiseFn.PARTIALS, main="decisions"))
        eps = config.eps
        block_results = (pairwise[PairwiseFn.PARTIALS]
                         | "CombinePartials" >> beam.CombinePerKey(CombineBlockPartialsFn())
                         | "BlockDecisions" >> beam.Map(_block_decisions, eps))
        # Each element: (file key, Decisions of one cluster or one block of it).
        decisions = (pairwise.decisions, block_results) | "AllDecisions" >> beam.Flatten()
        if config.border_margin is not None:
            decisions = (decisions
                         | "Memberships" >> beam.FlatMap(_memberships)
                         | "GroupMemberships" >> beam.GroupByKey()
                         | "MergeMemberships" >> beam.MapTuple(
                             lambda _, rows: merge_memberships(rows))
                         | "ByHomeFile" >> beam.Map(_home_file, sizes_dict, config.block_rows)
                         | "GroupByHomeFile" >> beam.GroupByKey()
                         | "AsDecisions" >> beam.Map(_decisions_from_memberships))
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
        invalid = checked[CheckRowsFn.INVALID]
        invalid_summary = invalid | "SummariseInvalid" >> beam.CombineGlobally(InvalidSummary())
        normalized = (checked[CheckRowsFn.NORMALIZED]
                      | "CountNormalized" >> beam.CombineGlobally(sum))
        info = (plan
                | "Info" >> beam.Map(
                    lambda pl, k_, st, rows, inv, norm: dict(
                        pl.as_dict(), n_clusters=k_, pairwise_block_size=rows, **st,
                        input_checks=_input_checks(inv, norm)),
                    beam.pvalue.AsSingleton(k), beam.pvalue.AsSingleton(stats),
                    config.block_rows, beam.pvalue.AsSingleton(invalid_summary),
                    beam.pvalue.AsSingleton(normalized)))
        return CoreOutputs(decisions=decisions | "Decisions" >> beam.Values(), exact=exact,
                           written=written, info=info, invalid=invalid)


def _cleanup_after(config: DedupConfig, written: list):
    """Delete dedup/_staging once every dedup output is written (side inputs order it)."""
    staging = config.staging_dir

    def cleanup(_, *done):
        discard(staging)
        return 1

    p = written[0].pipeline
    return (p
            | "CleanupOnce" >> beam.Create([None])
            | "DeleteStaging" >> beam.Map(cleanup, *[_count_done(w, f"Written{i}")
                                                     for i, w in enumerate(written)]))
