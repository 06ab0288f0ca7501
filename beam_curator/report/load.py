"""Read a run's written outputs into what the report shows.

Only the outputs are read (summary.json, samples/*.parquet, errors/*.parquet, dedup/), never
the pipeline's state, so `python -m beam_curator report --output DIR` works on any finished run,
local or gs://. The parquet files are streamed one at a time and folded into fixed-size
aggregates (fine-grid histograms, per-cluster counts, a bounded pick of duplicate pairs), so
memory does not grow with the number of samples. The few thumbnails the report shows, and the
captions of the CLIP-score extremes (samples/ holds the score, not the caption), are read from
the source shards named by the `shard_url` column (see thumbs.py).
"""
from __future__ import annotations

import collections
import heapq
import json
import posixpath
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from beam_curator import outputs
from beam_curator.errors import OptionError
from beam_curator.report.charts import FineHistogram
from beam_curator.schema import (
    EXACT_DUPLICATE,
    FILTERED_AESTHETIC,
    FILTERED_CLIP_SCORE,
    FILTERED_NSFW,
    FILTERED_TARGET,
    KEPT,
    REFERENCE_DUPLICATE,
    SEMANTIC_DUPLICATE,
    STATUSES,
    shard_of_id,
)

MAX_PAIRS = 24            # duplicate pairs in the gallery
MAX_EXACT_PAIRS = 8       # of which exact duplicates, when there are semantic ones to show
SPOTLIGHT = 8             # thumbnails per "highest / lowest aesthetic score" strip
CLIP_EXTREMES = 5         # pairs per "highest / lowest CLIP score" list
MAX_ERROR_REASONS = 12
MAX_REFERENCE_MATCHES = 20   # rows of the "Matched a reference" table (summary.json has 20)
_MAX_DISTINCT_REASONS = 10_000   # beyond this, new reasons are counted as "(other reasons)"

_SAMPLE_COLUMNS = ["id", "shard", "status", "aesthetic_score", "nsfw_score", "cluster",
                   "duplicate_of", "cosine_sim", "shard_url", "clip_score"]
# Series of the score histograms: what happened to the samples that were scored.
SCORE_SERIES = ("passed", FILTERED_AESTHETIC, FILTERED_NSFW)
COSINE_SERIES = (KEPT, SEMANTIC_DUPLICATE)
# The statuses of a sample that passed the score filters: kept, or taken later by the dedup
# step (duplicates among the candidates or of a --reference, outside the --target).
PASSED_STATUSES = (KEPT, EXACT_DUPLICATE, SEMANTIC_DUPLICATE, REFERENCE_DUPLICATE,
                   FILTERED_TARGET)
# Series of the CLIP-score histogram: every scored sample is in exactly one ("other": a
# scored sample with any other status, which the graph does not make today).
CLIP_SERIES = ("passed", FILTERED_CLIP_SCORE, FILTERED_AESTHETIC, FILTERED_NSFW, "other")


class ReportError(OptionError):
    """The directory is not a finished run's output: the message says what is missing."""


@dataclass(frozen=True)
class Pair:
    """A removed duplicate and the sample it duplicates."""

    status: str              # exact_duplicate or semantic_duplicate
    id: str
    duplicate_of: str
    cosine_sim: Optional[float]


@dataclass(frozen=True)
class ReferenceMatch:
    """A candidate and the --reference row nearest it (summary.json's
    dedup.reference.top_matches): a reference duplicate when cosine_sim >= the threshold."""

    id: str
    reference_id: str
    cosine_sim: Optional[float]


@dataclass
class ErrorGroup:
    stage: str
    reason: str
    count: int
    example: str             # an id, or shard + member for shard-level errors


@dataclass
class RunData:
    output_dir: str
    summary: dict
    summary_name: str                       # summary.json, or summary.FAILED.json
    samples_files: int = 0
    rows: int = 0
    counts_from_samples: Dict[str, int] = field(default_factory=dict)
    aesthetic: FineHistogram = None
    nsfw: FineHistogram = None
    cosine: FineHistogram = None
    clip: FineHistogram = None              # clip_score of every scored sample
    first_ranked: int = 0                   # kept samples ranked first in their cluster
    clusters: Dict[int, Dict[str, int]] = field(default_factory=dict)
    n_centroids: Optional[int] = None
    dedup_present: bool = False
    dedup_files: Dict[str, int] = field(default_factory=dict)
    n_removal_ids: Optional[int] = None     # rows of dedup/duplicates (outputs without samples/)
    pairs: List[Pair] = field(default_factory=list)
    n_pairs: Dict[str, int] = field(default_factory=dict)
    spotlight_best: List[Tuple[float, str]] = field(default_factory=list)
    spotlight_worst: List[Tuple[float, str]] = field(default_factory=list)
    # (clip_score, id) of the CLIP_EXTREMES highest / lowest scored samples (not NSFW ones)
    clip_best: List[Tuple[float, str]] = field(default_factory=list)
    clip_worst: List[Tuple[float, str]] = field(default_factory=list)
    errors: List[ErrorGroup] = field(default_factory=list)
    n_errors: int = 0
    n_error_reasons: int = 0
    errors_files: int = 0
    shard_urls: Dict[str, str] = field(default_factory=dict)   # shard name -> url
    id_status: Dict[str, str] = field(default_factory=dict)    # status of the ids shown
    # the highest-cosine --reference matches, highest first (summary.json: at most 20)
    reference_matches: List[ReferenceMatch] = field(default_factory=list)

    @property
    def options(self) -> dict:
        return self.summary.get("options") or {}

    @property
    def reference(self) -> Optional[dict]:
        """summary.json's dedup.reference (the run had a --reference), else None."""
        info = (self.summary.get("dedup") or {}).get("reference")
        return info if isinstance(info, dict) else None

    @property
    def target(self) -> Optional[dict]:
        """summary.json's dedup.target (the run had a --target), else None."""
        info = (self.summary.get("dedup") or {}).get("target")
        return info if isinstance(info, dict) else None


def read_json(path: str) -> dict:
    with FileSystems.open(path) as handle:
        return json.loads(handle.read().decode("utf-8"))


def _read_parquet(path: str, columns=None):
    with FileSystems.open(path) as handle:
        data = handle.read()
    import pyarrow as pa

    parquet = pq.ParquetFile(pa.BufferReader(data))
    if columns is not None:   # decode only these (older outputs may lack some)
        columns = [c for c in columns if c in parquet.schema_arrow.names]
    return parquet.read(columns=columns)


def _glob(pattern: str) -> List[str]:
    try:
        return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
    except Exception:   # noqa: BLE001 (a missing directory matches nothing)
        return []


def _exists(path: str) -> bool:
    try:
        return FileSystems.exists(path)
    except Exception:   # noqa: BLE001
        return False


def load_summary(output_dir: str) -> Tuple[dict, str]:
    path = outputs.summary_file(output_dir)
    if _exists(path):
        return read_json(path), outputs.SUMMARY
    failed = FileSystems.join(output_dir, "summary.FAILED.json")
    if _exists(failed):
        return read_json(failed), "summary.FAILED.json"
    raise ReportError(
        f"{path} does not exist: {output_dir} is not the output of a finished `run` (summary.json "
        "is written last). Point --output at a run's output directory, or rerun the pipeline.")


def load_run(output_dir: str, summary: Optional[dict] = None) -> RunData:
    output_dir = output_dir.rstrip("/") or output_dir
    if summary is None:
        summary, name = load_summary(output_dir)
    else:
        name = outputs.SUMMARY
    data = RunData(output_dir=output_dir, summary=summary, summary_name=name)
    data.aesthetic = FineHistogram(-2.0, 12.0, 1400, SCORE_SERIES)
    data.nsfw = FineHistogram(0.0, 1.0, 1000, SCORE_SERIES)
    data.cosine = FineHistogram(-1.0, 1.0, 2000, COSINE_SERIES)
    data.clip = FineHistogram(-1.0, 1.0, 2000, CLIP_SERIES)
    data.reference_matches = reference_matches(data.reference)
    _load_samples(data)
    _load_errors(data)
    _load_dedup(data)
    return data


def _load_samples(data: RunData) -> None:
    """One pass over samples/*.parquet, each file read once and folded into the aggregates
    (`_fold_statuses_and_scores`), the gallery's pairs (`_PairPicker`), the spotlight
    strips (`_Spotlight`) and the CLIP-score extremes (`_Extremes`); then the statuses of
    the ids those show."""
    counts = collections.Counter()
    clusters: Dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    pairs, spotlight, clip = _PairPicker(), _Spotlight(), _Extremes(CLIP_EXTREMES)
    files = _glob(FileSystems.join(outputs.samples_dir(data.output_dir), "*.parquet"))
    data.samples_files = len(files)
    for path in files:
        table = _read_parquet(path, _SAMPLE_COLUMNS)
        cols = {name: table.column(name).to_numpy(zero_copy_only=False)
                for name in table.column_names}
        n = table.num_rows
        data.rows += n
        if not n:
            continue
        cols["status"] = cols["status"].astype(str)
        cols["aesthetic_score"] = _floats(cols.get("aesthetic_score"), n)
        cols["cosine_sim"] = _floats(cols.get("cosine_sim"), n)
        cols["clip_score"] = _floats(cols.get("clip_score"), n)
        _fold_statuses_and_scores(data, counts, clusters, cols, n)
        pairs.add(cols)
        spotlight.add(cols)
        # NSFW-filtered samples are never shown (as in the aesthetic strips).
        scored = np.isfinite(cols["clip_score"]) & (cols["status"] != FILTERED_NSFW)
        clip.add(cols["id"], cols["clip_score"], scored, scored)

    data.counts_from_samples = {s: counts.get(s, 0) for s in STATUSES}
    for s in sorted(set(counts) - set(STATUSES)):
        data.counts_from_samples[s] = counts[s]
    data.clusters = {c: dict(v) for c, v in sorted(clusters.items())}
    data.n_pairs = {EXACT_DUPLICATE: counts.get(EXACT_DUPLICATE, 0),
                    SEMANTIC_DUPLICATE: counts.get(SEMANTIC_DUPLICATE, 0)}
    data.pairs = pairs.pick()
    data.spotlight_best, data.spotlight_worst = spotlight.best(), spotlight.worst()
    data.clip_best, data.clip_worst = clip.best(), clip.worst()
    shown = {p.id for p in data.pairs} | {p.duplicate_of for p in data.pairs}
    shown |= {i for _, i in data.spotlight_best} | {i for _, i in data.spotlight_worst}
    shown |= {i for _, i in data.clip_best} | {i for _, i in data.clip_worst}
    shown |= {m.id for m in data.reference_matches}
    data.id_status.update(_statuses_of(shown, files))


def reference_matches(info: Optional[dict]) -> List[ReferenceMatch]:
    """The top matches of summary.json's dedup.reference, in its order (highest cosine
    first), at most MAX_REFERENCE_MATCHES; rows without an id are left out."""
    rows = (info or {}).get("top_matches")
    out: List[ReferenceMatch] = []
    for row in rows if isinstance(rows, list) else []:
        if not isinstance(row, dict) or row.get("id") is None:
            continue
        sim = row.get("cosine_sim")
        sim = float(sim) if isinstance(sim, (int, float)) else None
        ref = row.get("reference_id")
        out.append(ReferenceMatch(str(row["id"]), "" if ref is None else str(ref), sim))
        if len(out) == MAX_REFERENCE_MATCHES:
            break
    return out


def _fold_statuses_and_scores(data: RunData, counts, clusters, cols: dict, n: int) -> None:
    """Counts per status and per cluster, shard urls, the score and cosine histograms."""
    status, aest, cos = cols["status"], cols["aesthetic_score"], cols["cosine_sim"]
    values, n_each = np.unique(status, return_counts=True)
    counts.update(dict(zip(values.tolist(), n_each.tolist())))
    for shard, url in zip(cols.get("shard", []), cols.get("shard_url", [])):
        if shard is not None and url is not None and shard not in data.shard_urls:
            data.shard_urls[shard] = url
    nsfw = _floats(cols.get("nsfw_score"), n)
    scored_series = {
        "passed": np.isin(status, PASSED_STATUSES),
        FILTERED_AESTHETIC: status == FILTERED_AESTHETIC,
        FILTERED_NSFW: status == FILTERED_NSFW,
    }
    for series, mask in scored_series.items():
        data.aesthetic.add(series, aest[mask])
        data.nsfw.add(series, nsfw[mask])
    clip = cols["clip_score"]
    clip_series = {"passed": np.isin(status, PASSED_STATUSES),
                   FILTERED_CLIP_SCORE: status == FILTERED_CLIP_SCORE,
                   FILTERED_AESTHETIC: status == FILTERED_AESTHETIC,
                   FILTERED_NSFW: status == FILTERED_NSFW}
    clip_series["other"] = ~np.logical_or.reduce(list(clip_series.values()))
    for series, mask in clip_series.items():
        data.clip.add(series, clip[mask])
    # A cluster's first-ranked member has no earlier member: score exactly 0.0, not drawn.
    first = (status == KEPT) & (cos == 0.0)
    data.first_ranked += int(first.sum())
    for series in COSINE_SERIES:
        data.cosine.add(series, cos[(status == series) & ~first])
    cluster = _floats(cols.get("cluster"), n)
    assigned = np.isfinite(cluster)
    for value in np.unique(status[assigned]):
        ids_of = cluster[assigned & (status == value)].astype(np.int64)
        for c, k in zip(*np.unique(ids_of, return_counts=True)):
            clusters[int(c)][str(value)] += int(k)


class _PairPicker:
    """The gallery's duplicate pairs: the smallest ids of the exact copies, and the
    semantic ones spread over the similarity range, in bounded heaps."""

    def __init__(self):
        self._exact: List[Tuple[str, str, float]] = []   # smallest ids, as a max-heap
        # fine cosine bin (0.001 wide) -> the MAX_PAIRS smallest ids in it (a max-heap)
        self._semantic_by_bin: Dict[int, List[Tuple[str, Tuple[str, str, float]]]] = {}

    def add(self, cols: dict) -> None:
        dup_of = cols.get("duplicate_of")
        if dup_of is None:
            return
        ids, status, cos = cols["id"], cols["status"], cols["cosine_sim"]
        has_dup = np.array([d is not None for d in dup_of], dtype=bool)
        # Only the candidates that can make the cut go through the Python heaps.
        exact_rows = np.flatnonzero((status == EXACT_DUPLICATE) & has_dup)
        for i in _smallest_ids(ids, exact_rows, np.zeros(len(exact_rows), np.int64)):
            _push_smallest(self._exact, (str(ids[i]), str(dup_of[i]), float(cos[i])))
        sem_rows = np.flatnonzero((status == SEMANTIC_DUPLICATE) & has_dup & np.isfinite(cos))
        bins = np.clip(np.floor((cos[sem_rows] + 1.0) * 1000), 0, 1999).astype(np.int64)
        for i, b in zip(*_smallest_ids(ids, sem_rows, bins, with_groups=True)):
            _push_smallest(self._semantic_by_bin.setdefault(int(b), []),
                           (str(ids[i]), str(dup_of[i]), float(cos[i])))

    def pick(self) -> List[Pair]:
        exact = sorted(e for _, e in self._exact)
        # Sorted by similarity (ties by id); dense regions hold at most MAX_PAIRS per 0.001.
        semantic = sorted((e for b in self._semantic_by_bin.values() for _, e in b),
                          key=lambda e: (e[2], e[0]))
        n_exact = min(len(exact), MAX_EXACT_PAIRS if semantic else MAX_PAIRS)
        n_semantic = min(len(semantic), MAX_PAIRS - n_exact)
        n_exact = min(len(exact), MAX_PAIRS - n_semantic)
        pairs = [Pair(EXACT_DUPLICATE, i, d, s) for i, d, s in exact[:n_exact]]
        # Spread over the similarity range: the borderline pairs (near 1 - eps) and the
        # obvious ones both show, most similar first.
        for i, d, s in reversed(_spread(semantic, n_semantic)):
            pairs.append(Pair(SEMANTIC_DUPLICATE, i, d, s))
        return pairs


class _Extremes:
    """The k highest values among rows of one mask and the k lowest among rows of another,
    ties to the smallest id, in two bounded heaps (files fold in one at a time)."""

    def __init__(self, k: int):
        self._k = k
        self._best: List[Tuple[float, str]] = []    # min-heap of the highest values
        self._worst: List[Tuple[float, str]] = []   # min-heap of the negated lowest

    def _keep(self, heap: list, item) -> None:
        if len(heap) < self._k:
            heapq.heappush(heap, item)
        elif item > heap[0]:
            heapq.heapreplace(heap, item)

    def add(self, ids, values: np.ndarray, best_mask: np.ndarray,
            worst_mask: np.ndarray) -> None:
        # Only each file's own top k (and its ties) go through the Python heaps.
        for i in _top(values, best_mask & np.isfinite(values), self._k):
            self._keep(self._best, (float(values[i]), _neg_key(str(ids[i]))))
        for i in _top(-values, worst_mask & np.isfinite(values), self._k):
            self._keep(self._worst, (-float(values[i]), _neg_key(str(ids[i]))))

    def best(self) -> List[Tuple[float, str]]:
        """(value, id), highest first (ties: smallest id first)."""
        return sorted(((s, _unneg(k)) for s, k in self._best), key=lambda t: (-t[0], t[1]))

    def worst(self) -> List[Tuple[float, str]]:
        """(value, id), lowest first (ties: smallest id first)."""
        return sorted(((-s, _unneg(k)) for s, k in self._worst), key=lambda t: (t[0], t[1]))


class _Spotlight(_Extremes):
    """The highest-scored kept samples and the lowest-scored filtered ones (bounded heaps)."""

    def __init__(self):
        super().__init__(SPOTLIGHT)

    def add(self, cols: dict) -> None:
        status, aest = cols["status"], cols["aesthetic_score"]
        super().add(cols["id"], aest, status == KEPT, status == FILTERED_AESTHETIC)


def _statuses_of(ids: set, files: List[str]) -> Dict[str, str]:
    """The status of each id, read from its own shard's samples file only."""
    found: Dict[str, str] = {}
    if not ids:
        return found
    shards = {shard_of_id(i) for i in ids}   # samples/<shard>.parquet
    for path in files:
        if posixpath.basename(path)[:-len(".parquet")] not in shards:
            continue
        table = _read_parquet(path, ["id", "status"])
        for i, s in zip(table.column("id").to_pylist(), table.column("status").to_pylist()):
            if i in ids:
                found[i] = s
    return found


def _smallest_ids(ids, rows: np.ndarray, groups: np.ndarray, with_groups: bool = False):
    """Of `rows`, the MAX_PAIRS with the smallest ids within each group (vectorised)."""
    if not len(rows):
        return ([], []) if with_groups else []
    keys = np.asarray([str(i) for i in ids[rows]], dtype=str)
    order = np.lexsort((keys, groups))
    sorted_groups = groups[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_groups)) + 1]
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    keep = order[rank < MAX_PAIRS]
    return (rows[keep], groups[keep]) if with_groups else rows[keep]


def _top(values: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
    """Rows of the k largest `values` where `mask` (plus every row tied with the k-th)."""
    rows = np.flatnonzero(mask)
    if len(rows) <= k:
        return rows
    kth = np.partition(values[rows], len(rows) - k)[len(rows) - k]
    return rows[values[rows] >= kth]


def _push_smallest(heap: list, entry: Tuple[str, str, float]) -> None:
    """Keep the MAX_PAIRS entries with the smallest ids in `heap` (a max-heap by id)."""
    item = (_neg_key(entry[0]), entry)
    if len(heap) < MAX_PAIRS:
        heapq.heappush(heap, item)
    elif item > heap[0]:
        heapq.heapreplace(heap, item)


def _spread(items: list, n: int) -> list:
    """n items evenly spaced through a sorted list (all of them when n >= len)."""
    if n >= len(items):
        return list(items)
    if n <= 0:
        return []
    if n == 1:
        return [items[-1]]
    picks = sorted({round(k * (len(items) - 1) / (n - 1)) for k in range(n)})
    return [items[p] for p in picks]


class _neg_key(str):
    """A string that sorts in reverse: heaps of `_neg_key(id)` keep the smallest ids."""

    def __lt__(self, other):
        return str.__gt__(self, other)

    def __gt__(self, other):
        return str.__lt__(self, other)

    def __le__(self, other):
        return str.__ge__(self, other)

    def __ge__(self, other):
        return str.__le__(self, other)


def _unneg(key) -> str:
    return str.__str__(key)


def _floats(column, n: int) -> np.ndarray:
    if column is None:
        return np.full(n, np.nan)
    return np.array([np.nan if v is None else v for v in column], dtype=np.float64) \
        if column.dtype == object else column.astype(np.float64)


def _load_errors(data: RunData) -> None:
    groups: Dict[Tuple[str, str], List] = {}
    other = 0
    files = _glob(FileSystems.join(data.output_dir, "errors", "*.parquet"))
    data.errors_files = len(files)
    for path in files:
        table = _read_parquet(path, ["id", "shard", "member", "stage", "reason"])
        rows = table.to_pylist()
        data.n_errors += len(rows)
        for row in rows:
            key = (row.get("stage") or "", row.get("reason") or "")
            example = row.get("id") or "{} {}".format(row.get("shard") or "",
                                                      row.get("member") or "").strip()
            if key in groups:
                groups[key][0] += 1
                if example < groups[key][1]:
                    groups[key][1] = example
            elif len(groups) < _MAX_DISTINCT_REASONS:
                groups[key] = [1, example]
            else:
                other += 1
    data.n_error_reasons = len(groups) + (1 if other else 0)
    ranked = sorted(groups.items(), key=lambda kv: (-kv[1][0], kv[0]))
    data.errors = [ErrorGroup(stage, reason, count, example)
                   for (stage, reason), (count, example) in ranked[:MAX_ERROR_REASONS]]
    if other:
        data.errors.append(ErrorGroup("", "(other reasons)", other, ""))


def _load_dedup(data: RunData) -> None:
    dedup = outputs.dedup_dir(data.output_dir)
    # A glob, not exists(): on gs:// and s3:// a "directory" is only a prefix.
    data.dedup_present = bool(_glob(FileSystems.join(dedup, "**")))
    if not data.dedup_present:
        return
    for sub in ("kmeans", "pairwise_results", "duplicates"):
        data.dedup_files[sub] = len(_glob(FileSystems.join(dedup, sub, "*.parquet")))
    if not data.samples_files:
        # A `dedup` output has no samples/: cluster sizes and duplicates from dedup/ itself.
        sizes = collections.Counter()
        for path in _glob(FileSystems.join(dedup, "kmeans", "*.parquet")):
            sizes.update(_read_parquet(path, ["centroid"]).column("centroid").to_pylist())
        data.clusters = {int(c): {"assigned": n} for c, n in sorted(sizes.items())
                         if c is not None}
        data.n_removal_ids = sum(
            _read_parquet(path, ["id"]).num_rows
            for path in _glob(FileSystems.join(dedup, "duplicates", "*.parquet")))
    centroids = FileSystems.join(dedup, "centroids.npy")
    if _exists(centroids):
        try:
            with FileSystems.open(centroids) as handle:
                version = np.lib.format.read_magic(handle)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, _ = read_header(handle)
            data.n_centroids = int(shape[0])
        except Exception:   # noqa: BLE001 (the report still renders without k)
            data.n_centroids = None
