"""The public dedup transforms: `Deduplicate` (samples in a pipeline) and
`DeduplicateEmbeddings` (embedding files: the three-step flow's step 2).

Both run the same core (`transforms/semdedup.py`) on row-group chunks of embedding files, so a
pipeline, `run`, and `embed` + `dedup` give the same answer for the same centroids.
"""
from __future__ import annotations

import logging
from typing import List, NamedTuple, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np

from beam_curator.dedup.blocks import DEFAULT_BLOCK_ROWS
from beam_curator.defaults import DEFAULT_EPS, SHUFFLE
from beam_curator.errors import OptionError
from beam_curator.schema import (
    ERROR,
    EXACT_DUPLICATE,
    FILTERED_TARGET,
    KEPT,
    REFERENCE_DUPLICATE,
    SEMANTIC_DUPLICATE,
    STAGE_EMBED,
    DedupDecision,
    SampleInfo,
    SampleResult,
    shard_of_id,
)
from beam_curator.transforms.semdedup import DedupConfig, SemanticDedup
from beam_curator.transforms.semdedup.pairwise import ReferenceSet
from beam_curator.transforms.semdedup.records import Decisions
from beam_curator.transforms.semdedup.sources import (
    REFERENCE,
    TARGET,
    check_embedding_sources,
    chunk_names,
    embeddings_files,
    npy_shape,
    resolve_embeddings,
    row_group_chunks,
)

__all__ = ["Deduplicate", "DeduplicateEmbeddings", "DedupResult"]

_LOG = logging.getLogger(__name__)


class DedupResult(NamedTuple):
    """What the dedup transforms return.

    results: one element per input embedding: a SampleResult (`Deduplicate`) or a
        DedupDecision (`DeduplicateEmbeddings`), status kept / exact_duplicate /
        semantic_duplicate.
    written: one element once everything under OUTPUT/dedup/ is written.
    info: one dict: what the data decided (k and how it was chosen, the k-means sample, the
        largest cluster, how many clusters were cut into blocks) and `input_checks`: the
        rows left out (null id or embedding, NaN / infinite, zero: counted, up to 20 named)
        and how many were normalised to unit length.
    counts: (status, n) per status, counted per cluster rather than per embedding: what a
        summary needs without a Python object per row (`results` costs one each).
    """

    results: beam.PCollection
    written: beam.PCollection
    info: beam.PCollection
    counts: beam.PCollection


def _decision_rows(decisions: Decisions):
    """Columnar Decisions -> one DedupDecision per member. A reference duplicate is that
    first (its answer names the reference row), then a semantic duplicate, else kept."""
    ref = decisions.reference
    for k, (id_, max_id, sim, dup) in enumerate(decisions.rows()):
        if ref is not None and decisions.is_reference_duplicate[k]:
            yield DedupDecision(id_, REFERENCE_DUPLICATE, decisions.cluster, ref.ids[k],
                                float(ref.sim[k]))
            continue
        yield DedupDecision(id_, SEMANTIC_DUPLICATE if dup else KEPT, decisions.cluster,
                            max_id, sim)


def _target_rows(filtered):
    """(chunk, ids, home clusters) outside --target -> DedupDecision each (duplicate_of:
    itself, as for a kept sample first in its cluster; no similarity was computed)."""
    _, ids, clusters = filtered
    for id_, cluster in zip(ids, np.asarray(clusters).tolist()):
        yield DedupDecision(id_, FILTERED_TARGET, cluster, id_, 0.0)


def _decisions(core) -> beam.PCollection:
    return ((core.decisions | "DecisionRows" >> beam.FlatMap(_decision_rows),
             core.exact | "ExactRows" >> beam.Map(
                 lambda e: DedupDecision(e.id, EXACT_DUPLICATE, None, e.survivor, 1.0)),
             core.filtered | "TargetRows" >> beam.FlatMap(_target_rows))
            | "AllDecisions" >> beam.Flatten())


def _semantic_counts(decisions: Decisions):
    """Columnar Decisions -> (status, n): one pair per status per cluster, not per member."""
    removed = decisions.is_duplicate
    counts = []
    if decisions.reference is not None:
        ref_dups = decisions.is_reference_duplicate
        counts.append((REFERENCE_DUPLICATE, int(np.count_nonzero(ref_dups))))
        removed = removed & ~ref_dups
        beam.metrics.Metrics.counter("curator", "reference_duplicates").inc(counts[0][1])
        removed_all = decisions.is_duplicate | ref_dups
    else:
        removed_all = removed
    n_dups = int(np.count_nonzero(removed))
    n_kept = len(removed) - int(np.count_nonzero(removed_all))
    beam.metrics.Metrics.counter("curator", "semantic_duplicates").inc(n_dups)   # the live
    beam.metrics.Metrics.counter("curator", "kept").inc(n_kept)                  # progress line
    return counts + [(SEMANTIC_DUPLICATE, n_dups), (KEPT, n_kept)]


def _status_counts(core) -> beam.PCollection:
    """(status, n) for every dedup status, from combiners."""
    return ((core.decisions | "SemanticCounts" >> beam.FlatMap(_semantic_counts),
             core.exact | "ExactCounts" >> beam.Map(lambda _: (EXACT_DUPLICATE, 1)),
             core.filtered | "TargetCounts" >> beam.Map(lambda f: (FILTERED_TARGET, len(f[1]))))
            | "AllCounts" >> beam.Flatten()
            | "CountStatuses" >> beam.CombinePerKey(sum))


def _result_of(info: SampleInfo, decision: DedupDecision) -> SampleResult:
    duplicate = decision.status not in (KEPT, FILTERED_TARGET)   # of something, that is
    return SampleResult(info=info, status=decision.status, cluster=decision.cluster,
                        duplicate_of=decision.duplicate_of if duplicate else None,
                        cosine_sim=decision.cosine_sim)


def _results_of_shard(element):
    """One shard's candidates joined with their dedup answers -> SampleResult each (an
    embedding dedup could not use is an error of the sample)."""
    shard, grouped = element
    infos = {info.id: info for info in grouped["info"]}
    for decision in grouped["decision"]:
        yield _result_of(infos.pop(decision.id), decision)
    for row in grouped["invalid"]:
        yield SampleResult(info=infos.pop(row.id), status=ERROR, stage=STAGE_EMBED,
                           reason=f"embedding unusable for dedup: {row.reason}")
    if infos:   # a bug, never a silent loss: the accounting check would fail anyway
        raise RuntimeError(f"dedup gave no answer for {len(infos)} candidate(s) of shard "
                           f"{shard}, e.g. {sorted(infos)[0]}")


class Deduplicate(beam.PTransform):
    """Exact + semantic dedup (SemDeDup) of samples: (SampleInfo, embedding) -> DedupResult.

    The exact pre-pass keeps the smallest id among identical image bytes (same
    `content_hash`); the semantic pass clusters the rest with spherical k-means (centroids
    as a side input), and inside each cluster a member is a duplicate when its cosine
    similarity to an earlier-ranked member is >= 1 - eps. Outputs under `output_dir/dedup/`:
    centroids.npy, kmeans/, pairwise_results/ and duplicates/ (NeMo Curator's formats).

    An embedding dedup cannot use (NaN, infinite or all zero) makes its sample an `error`
    (stage embed); one not of unit length is normalised (`info["input_checks"]` counts both).

    The vectors are read from embeddings parquet (they never travel as Python lists):
    without `embeddings_written` this transform writes `output_dir/embeddings/` from the
    (SampleInfo, embedding) pairs it is given. With `embeddings_written`, the paths a
    `WriteEmbeddings` step emitted, it is given the candidates' SampleInfo alone (as `run`
    does) and reads their vectors from those files.

    Args:
      output_dir: where dedup/ (and, without embeddings_written, embeddings/) are written.
      n_clusters: k; None = one cluster per 10,000 candidates (at least 1).
      eps: duplicate when max cosine similarity to an earlier-ranked member >= 1 - eps.
      which_to_keep: "hard" (farthest from the centroid kept), "easy" or "random".
      centroids: a (k, d) .npy to use instead of training.
      kmeans_iterations, kmeans_seed: k-means settings (the seed also orders "random").
      kmeans_sample_size: training rows; None = 64 per centroid.
      pairwise_block_size: most members of one cluster per pairwise work item and side.
      border_margin: also place a point in its second cluster when within this cosine
        distance of the nearest (raises recall); None = SemDeDup.
      vector_transport: "shuffle" (anywhere) or "staged" (a local output_dir that every
        worker sees at the same path: one machine or a shared mount; checked by a marker
        the graph writes when it is built, see vectors.mark_staging).
      device: "auto", "cpu" or "cuda": where the dense math runs (same decisions).
      embeddings_written: optional PCollection of embeddings parquet paths (see above).
      reference: comma-separated globs / directories of embeddings to dedup AGAINST (read
        like the inputs, same column names): a candidate whose cosine to a reference row is
        >= 1 - reference_eps is a `reference_duplicate`; reference rows are never removed,
        answered for or written. They are compared inside the candidates' clusters (same
        centroids, same --border_margin); see README "Dedup against other sets".
      reference_eps: the reference threshold's eps; None = eps.
      reference_exact: compare every candidate with every reference row instead (small
        references: an evaluation set; at most REFERENCE_EXACT_MAX_ROWS rows).
      target: globs of embeddings of a target set (DataComp's image-based filter): a
        candidate whose nearest centroid is no target row's nearest centroid is
        `filtered_target` and takes no further part.

    Example::

        import apache_beam as beam
        import numpy as np
        from beam_curator import Deduplicate, SampleInfo

        rng = np.random.default_rng(0)
        base = rng.normal(size=(20, 16)).astype(np.float32)
        vectors = np.concatenate([base, base[:3] * 1.0001])
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        candidates = [(SampleInfo(id=f"s/{i:03d}", shard="s", shard_url="s.tar",
                                  key=f"{i:03d}"), v) for i, v in enumerate(vectors)]
        with beam.Pipeline() as p:
            dedup = (p | beam.Create(candidates)
                       | Deduplicate("/tmp/dedup-example", n_clusters=2))
            dedup.results | beam.Map(lambda r: print(r.id, r.status))
    """

    def __init__(self, output_dir: str, *, n_clusters: Optional[int] = None,
                 eps: float = DEFAULT_EPS, which_to_keep: str = "hard",
                 centroids: Optional[str] = None, kmeans_iterations: int = 20,
                 kmeans_seed: int = 0, kmeans_sample_size: Optional[int] = None,
                 pairwise_block_size: int = DEFAULT_BLOCK_ROWS,
                 border_margin: Optional[float] = None, vector_transport: str = SHUFFLE,
                 device: str = "auto", embeddings_written: Optional[beam.PCollection] = None,
                 min_clip_score: Optional[beam.PCollection] = None,
                 reference: Optional[str] = None, reference_eps: Optional[float] = None,
                 reference_exact: bool = False, target: Optional[str] = None):
        """`min_clip_score`: a singleton PCollection (a float, or None): only the embeddings
        rows whose clip_score is at least this are candidates (the keep-top-fraction
        threshold, known once the whole pool is scored)."""
        super().__init__()
        self._config = DedupConfig(
            output=output_dir, n_clusters=n_clusters, eps=eps, which_to_keep=which_to_keep,
            centroids=centroids, kmeans_iterations=kmeans_iterations, kmeans_seed=kmeans_seed,
            kmeans_sample_size=kmeans_sample_size, pairwise_block_size=pairwise_block_size,
            border_margin=border_margin, vector_transport=vector_transport,
            device=device, reference_eps=reference_eps,
            reference_exact=reference_exact).checked()
        self._others = OtherSets(self._config, reference, target)
        self._embeddings_written = embeddings_written
        self._min_clip_score = min_clip_score

    def expand(self, candidates):
        from beam_curator.transforms.write import WriteEmbeddings

        written = self._embeddings_written
        if written is None:   # (SampleInfo, embedding) pairs: written, then read as chunks
            written = candidates | "WriteEmbeddings" >> WriteEmbeddings(self._config.output)
            candidates = candidates | "Infos" >> beam.Keys()
        config = self._config
        if self._min_clip_score is None:
            chunks = written | "RowGroups" >> beam.FlatMap(
                lambda path: row_group_chunks(path, chunk_names([path])[path], 0, config))
        else:
            chunks = written | "RowGroups" >> beam.FlatMap(
                lambda path, t: row_group_chunks(path, chunk_names([path])[path], 0, config, t),
                beam.pvalue.AsSingleton(self._min_clip_score))
        core = chunks | "SemDeDup" >> self._others.dedup(config, has_hash=True)
        decisions = _decisions(core)
        results = ({"info": candidates | "InfoByShard" >> beam.Map(
                        lambda info: (info.shard, info)),
                    "decision": decisions | "DecisionByShard" >> beam.Map(
                        lambda d: (shard_of_id(d.id), d)),
                    "invalid": core.invalid | "InvalidByShard" >> beam.Map(
                        lambda r: (shard_of_id(r.id or ""), r))}
                   | "JoinAnswersToShard" >> beam.CoGroupByKey()
                   | "Results" >> beam.FlatMap(_results_of_shard))
        return DedupResult(results=results, written=core.written, info=core.info,
                           counts=_status_counts(core))


class DeduplicateEmbeddings(beam.PTransform):
    """Exact + semantic dedup of embedding files -> DedupResult of DedupDecision rows.

    Reads parquet files with a string id and a list<float32> embedding column (an optional
    `content_hash` column enables the exact pre-pass; an optional `passed_filters` column
    limits dedup to the rows where it is true, as `embed` writes them), or clip-retrieval's
    `clip inference` output (img_emb/img_emb_N.npy + metadata/metadata_N.parquet, float16
    vectors re-normalised). Writes `output_dir/dedup/` like `Deduplicate`.

    The input is checked (`check_embedding_sources`) before any work; then every row: one
    whose length is not the dimension, or an id read twice, fails the run naming file and
    row; a null id or embedding, a NaN / infinite or zero vector is left out and counted
    (`info["input_checks"]`); a vector not of unit length is normalised (and counted).

    Args:
      file_pattern: comma-separated globs or directories (a directory: its *.parquet, or
        its clip-retrieval layout when it has img_emb/).
      output_dir: where dedup/ is written.
      id_column, embedding_column: the parquet column names (clip-retrieval: the id column,
        else `key`, else `image_path`).
      with_rows: False leaves `results` empty: the answers are still written under dedup/
        and counted in `counts`, without a Python object per embedding (the `dedup` command
        needs no more, and a Python object per row is what a large dedup costs most).
      The other keywords (reference, reference_eps, reference_exact, target too): as for
        `Deduplicate`.

    Example::

        import apache_beam as beam
        from beam_curator import DeduplicateEmbeddings

        with beam.Pipeline() as p:
            dedup = p | DeduplicateEmbeddings("emb/*.parquet", "/tmp/out", eps=0.02)
            dedup.results | beam.Filter(lambda d: d.status != "kept") | beam.Map(print)
    """

    def __init__(self, file_pattern: str, output_dir: str, *, id_column: str = "id",
                 embedding_column: str = "embedding", n_clusters: Optional[int] = None,
                 eps: float = DEFAULT_EPS, which_to_keep: str = "hard",
                 centroids: Optional[str] = None, kmeans_iterations: int = 20,
                 kmeans_seed: int = 0, kmeans_sample_size: Optional[int] = None,
                 pairwise_block_size: int = DEFAULT_BLOCK_ROWS,
                 border_margin: Optional[float] = None, vector_transport: str = SHUFFLE,
                 device: str = "auto", with_rows: bool = True,
                 resolved: Optional[Tuple[Sequence[str], Sequence[Tuple[str, str]]]] = None,
                 min_clip_score: Optional[float] = None, reference: Optional[str] = None,
                 reference_eps: Optional[float] = None, reference_exact: bool = False,
                 target: Optional[str] = None):
        """`resolved`: (parquet files, (npy, metadata) pairs) already resolved from
        `file_pattern` (the command line resolves them before it claims the output).
        `min_clip_score`: only rows whose clip_score column is at least this are candidates
        (an `embed` run's keep-top-fraction threshold, from its summary.json)."""
        super().__init__()
        self._with_rows = with_rows
        self._config = DedupConfig(
            output=output_dir, n_clusters=n_clusters, eps=eps, which_to_keep=which_to_keep,
            centroids=centroids, kmeans_iterations=kmeans_iterations, kmeans_seed=kmeans_seed,
            kmeans_sample_size=kmeans_sample_size, pairwise_block_size=pairwise_block_size,
            border_margin=border_margin, vector_transport=vector_transport, device=device,
            id_column=id_column, embedding_column=embedding_column, reference_eps=reference_eps,
            reference_exact=reference_exact).checked()
        self._others = OtherSets(self._config, reference, target)
        paths, pairs = resolved if resolved is not None else resolve_embeddings(file_pattern)
        if not paths and not pairs:
            raise ValueError(f"{file_pattern!r} matches no embeddings file")
        self._paths: List[str] = sorted(paths)
        self._npy_pairs = sorted(pairs)
        if min_clip_score is not None and self._npy_pairs:
            raise ValueError("min_clip_score needs parquet embeddings with a clip_score "
                             "column; clip-retrieval's img_emb/ has none")
        self._min_clip_score = min_clip_score

    def expand(self, pbegin):
        config = self._config
        dim, has_hash = check_embedding_sources(self._paths, self._npy_pairs, config)
        if config.vector_transport == SHUFFLE:
            _LOG.info("dedup: vectors travel through the shuffle as float32 bytes")
        files = embeddings_files(self._paths, self._npy_pairs, config)
        if self._npy_pairs:
            _LOG.info("dedup: clip-retrieval layout, %d img_emb files, ids from column %r",
                      len(self._npy_pairs), files[-1].id_column)
        chunks = (pbegin
                  | "Files" >> beam.Create(files)
                  | "OneFilePerWorkItem" >> beam.Reshuffle()
                  | "Chunks" >> beam.FlatMap(lambda f, *a: f.chunks(*a), dim, config,
                                             self._min_clip_score))
        self._others.check_dim(dim)
        core = chunks | "SemDeDup" >> self._others.dedup(config, has_hash, check_ids=True)
        # with_rows=False: an empty PCollection cut from the one-element info, not a new
        # source (on Flink each source is one more vertex with a task per slot, issue 30)
        results = (_decisions(core) if self._with_rows
                   else core.info | "NoRows" >> beam.FlatMap(lambda _: ()))
        return DedupResult(results=results, written=core.written, info=core.info,
                           counts=_status_counts(core))


# --reference_exact loads the whole reference on every worker: at most this many rows
# (1.5 GB of float32 at 768-d); a larger reference is compared inside the clusters instead.
REFERENCE_EXACT_MAX_ROWS = 500_000


class OtherSets:
    """--reference and --target of one dedup: resolved and checked when the graph is built,
    read as chunks of their own role in it."""

    def __init__(self, config: DedupConfig, reference: Optional[str], target: Optional[str]):
        self._config = config
        self._files = {}
        for role, pattern, flag in ((REFERENCE, reference, "--reference"),
                                    (TARGET, target, "--target")):
            if not pattern:
                continue
            paths, pairs = resolve_embeddings(pattern)
            if not paths and not pairs:
                raise OptionError(f"{flag} {pattern!r} matches no embeddings file: point it at "
                                  "embeddings parquet files or their directory, or a "
                                  "clip-retrieval output directory.")
            self._files[role] = (embeddings_files(paths, pairs, config, role), paths, pairs)
        if config.reference_exact and REFERENCE not in self._files:
            raise OptionError("--reference_exact compares with a --reference: give one, or "
                              "leave --reference_exact out.")
        if config.reference_exact:
            n = reference_rows(*self._files[REFERENCE][1:])
            if n > REFERENCE_EXACT_MAX_ROWS:
                raise OptionError(
                    f"--reference_exact loads the whole --reference on every worker, and it "
                    f"has {n:,} rows (at most {REFERENCE_EXACT_MAX_ROWS:,}): leave "
                    "--reference_exact out to compare inside the clusters.")

    def check_dim(self, dim: int) -> None:
        """Each set's embeddings have the candidates' dimension."""
        for role, (_, paths, pairs) in self._files.items():
            other, _ = check_embedding_sources(paths, pairs, self._config)
            if other != dim:
                raise OptionError(f"--{role} holds {other}-d embeddings, the candidates are "
                                  f"{dim}-d: dedup compares embeddings of one model.")

    def _chunks(self, p, role: str):
        files = self._files[role][0]
        config = self._config
        return (p
                | f"{role.title()}Files" >> beam.Create(files)
                | f"One{role.title()}FilePerWorkItem" >> beam.Reshuffle()
                | f"{role.title()}Chunks" >> beam.FlatMap(lambda f: f.chunks(0, config)))

    def dedup(self, config: DedupConfig, has_hash: bool, check_ids: bool = False
              ) -> SemanticDedup:
        """The SemanticDedup of the candidates with these sets (built in `expand`)."""
        return _WithOtherSets(self, config, has_hash, check_ids)


class _WithOtherSets(beam.PTransform):
    def __init__(self, others: OtherSets, config, has_hash, check_ids):
        super().__init__()
        self._others, self._config = others, config
        self._has_hash, self._check_ids = has_hash, check_ids

    def expand(self, chunks):
        others, p = self._others, chunks.pipeline
        references = targets = reference_set = None
        if REFERENCE in others._files:
            references = others._chunks(p, REFERENCE)
            if self._config.reference_exact:
                reference_set = ReferenceSet(others._files[REFERENCE][0], self._config)
        if TARGET in others._files:
            targets = others._chunks(p, TARGET)
        return chunks | "Core" >> SemanticDedup(self._config, self._has_hash, self._check_ids,
                                                references, targets, reference_set)


def reference_rows(paths: Sequence[str], pairs: Sequence[Tuple[str, str]]) -> int:
    """Rows of the resolved files, from parquet footers and .npy headers (no data read)."""
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    n = sum(npy_shape(npy)[0] for npy, _ in pairs)
    for path in paths:
        with FileSystems.open(path) as handle:
            n += pq.ParquetFile(handle).metadata.num_rows
    return n


def dedup_summary(counts, info) -> beam.PCollection:
    """The dedup command's counts (for summary.json): one dict from DedupResult.counts."""
    return (info
            | "DedupCounts" >> beam.Map(_counts_summary, beam.pvalue.AsDict(counts)))


def _counts_summary(info: dict, counts: dict) -> dict:
    """n_embeddings: the rows answered; with n_invalid_rows (left out, named in
    dedup.input_checks) every candidate row read is accounted for."""
    n = sum(counts.values())
    exact = counts.get(EXACT_DUPLICATE, 0)
    summary = {"n_embeddings": n, "n_duplicates": n - counts.get(KEPT, 0),
               "n_exact_duplicates": exact, "n_clusters": info["n_clusters"],
               "n_invalid_rows": info["input_checks"]["invalid_rows"]["count"],
               "n_normalized_rows": info["input_checks"]["normalized_rows"], "dedup": info}
    if "reference" in info:
        summary["n_reference_duplicates"] = counts.get(REFERENCE_DUPLICATE, 0)
    if "target" in info:
        summary["n_filtered_target"] = counts.get(FILTERED_TARGET, 0)
    return summary

