"""The columnar data carried through the dedup graph, and its staging I/O (no DoFns here).

Dedup elements are columnar: a `Chunk` is a reference to a batch of candidate rows (a parquet
row group of the embeddings: the `dedup` command's input, or what `run` has just written),
`Assigned` is a chunk's rows with their clusters, and `Members` holds the columns of the
members of one bin of small clusters (or of one block of a large cluster) from one chunk, so
a GroupByKey moves one element per chunk x bin (or block) instead of one pickled object per
sample. Vectors are read from the parquet where they are needed and are either *staged*
(raw float32 files under `dedup/_staging/`, written when a chunk is first decoded and again
in cluster order by the assign step; members carry (file, row) references) or *inline*
(float32 arrays in the element, the `shuffle` transport: the one time they cross a shuffle).
`Decisions` is the pairwise step's answer for the members of one cluster or block,
`BlockPartial` one block pair's contribution to it.

Kept apart from `beam_curator.transforms.semdedup` (the DoFns and PTransforms that move these
objects around) so the representation and its file formats can be read, tested and changed
on their own. Everything here is a module-level class or function: Beam pickles the elements.
"""
from __future__ import annotations

import dataclasses
import io
import os
from typing import Callable, FrozenSet, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from beam_curator.atomic import write_atomically
from beam_curator.dedup.blocks import positions_by_cluster
from beam_curator.transforms.dedup_plan import STAGED, DedupConfig


class InvalidRow(NamedTuple):
    """A row dedup cannot use (no id, no vector, or a vector without a direction): counted,
    named in summary.json, and kept out of every step."""

    id: Optional[str]
    file: str
    row: int              # its row in `file`
    reason: str


NULL_ID = "null id"
NULL_EMBEDDING = "null embedding"
NOT_FINITE = "NaN or infinite value"
ZERO_VECTOR = "zero vector"
REASONS = (None, NULL_ID, NULL_EMBEDDING, NOT_FINITE, ZERO_VECTOR)   # a row's code: its index

# A row whose norm is further than this from 1 is normalised, and counted: a norm off by t
# moves a cosine by about t, so this is far below any useful eps, and far above the float32
# rounding of a vector normalised already (~1e-7): such inputs stay bit for bit as they are.
UNIT_TOLERANCE = 1e-4
# float16 storage alone leaves norms ~1e-3 from 1: those rows are normalised (always, as
# clip-retrieval's are) but counted only when further off than this.
FLOAT16_TOLERANCE = 1e-2


class Decoded(NamedTuple):
    """A chunk's candidate rows as read, every one of them, with what is wrong with each."""

    ids: List[Optional[str]]
    vectors: np.ndarray        # float32 (n, d); the valid rows have norm 1
    reasons: np.ndarray        # uint8 per row: 0 valid, else an index into REASONS
    normalized: int            # valid rows that were not unit length
    file: str
    file_rows: np.ndarray      # int64: each row's number in `file`

    def invalid_rows(self):
        for r in np.flatnonzero(self.reasons).tolist():
            yield InvalidRow(self.ids[r], self.file, int(self.file_rows[r]),
                             REASONS[self.reasons[r]])

    def without(self, dropped: Sequence[int]) -> Tuple[List[str], np.ndarray]:
        """(ids, vectors) of the rows not in `dropped` (positions)."""
        if not dropped:
            return self.ids, self.vectors
        keep = np.ones(len(self.ids), dtype=bool)
        keep[list(dropped)] = False
        return [i for i, k in zip(self.ids, keep.tolist()) if k], self.vectors[keep]


def unit_rows(vectors: np.ndarray, tolerance: float = UNIT_TOLERANCE, every_row: bool = False
              ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors with every valid row of norm 1, a REASONS code per row, which rows were not
    unit length).

    Cosines are dot products downstream, so a row of norm 1.02 would look 2 % more similar to
    everything: rows off by more than `tolerance` are normalised (`every_row`: all valid rows,
    still reported by `tolerance`). Rows with a NaN or infinite value, or of norm 0, have no
    direction: they are marked, never compared."""
    vectors = np.asarray(vectors, dtype=np.float32)
    codes = np.zeros(len(vectors), dtype=np.uint8)
    if not len(vectors):
        return vectors, codes, np.zeros(0, dtype=bool)
    finite = np.isfinite(vectors).all(axis=1)
    squared = np.einsum("ij,ij->i", vectors, vectors)
    huge = finite & ~np.isfinite(squared)   # finite values whose float32 square overflows
    if huge.any():
        big = vectors[huge].astype(np.float64)
        squared = squared.astype(np.float64)
        squared[huge] = np.einsum("ij,ij->i", big, big)
    norms = np.sqrt(squared)
    codes[~finite] = REASONS.index(NOT_FINITE)
    codes[finite & (norms == 0)] = REASONS.index(ZERO_VECTOR)
    valid = codes == 0
    off = valid & (np.abs(norms - 1.0) > tolerance)
    scale = valid if every_row else off
    if scale.any():
        if not vectors.flags.writeable:   # a zero-copy view of an arrow buffer
            vectors = vectors.copy()
        vectors[scale] /= norms[scale, None].astype(np.float32)
    return vectors, codes, off


class ExactDuplicate(NamedTuple):
    """A copy found by the exact pre-pass (same content hash as a smaller id)."""

    id: str
    survivor: str
    chunk: str            # the chunk the copy was read from: where its outputs are written


# ---- chunks: a handful of rows and the way to their vectors --------------------------------

@dataclasses.dataclass(frozen=True)
class NpyRows:
    """Rows [start, stop) of a clip-retrieval `img_emb/img_emb_N.npy`; the ids are the same
    rows of `metadata/metadata_N.parquet`."""

    npy: str
    metadata: str
    start: int
    stop: int
    id_column: str


@dataclasses.dataclass(frozen=True)
class Chunk:
    """A batch of embeddings: a parquet row group, or rows of a clip-retrieval .npy.
    `excluded`: its exact duplicates (not candidates of the semantic pass); `dropped`: the
    positions of its invalid rows among its candidates (set by the row check, the first step
    that reads the vectors; every later read leaves them out); `min_clip_score`: only rows
    whose `clip_score` column is at least this are candidates (the keep-top-fraction
    threshold, known once the pool's scores are; None: no such condition)."""

    name: str
    parquet: Optional[Tuple[str, int]] = None       # (path, row group)
    dim: int = 0
    excluded: FrozenSet[str] = frozenset()
    npy: Optional[NpyRows] = None
    dropped: Tuple[int, ...] = ()
    min_clip_score: Optional[float] = None

    def ids(self, config: DedupConfig, with_hash: bool):
        """(id, content_hash or None) of the candidate rows, without the vectors."""
        ids, hashes, _ = self._candidate_ids(config, with_hash)
        return _without_positions(zip(ids, hashes), self.dropped)

    def places(self, config: DedupConfig):
        """(id, (file, row in the file)) of the candidate rows: where each id was read."""
        ids, _, rows = self._candidate_ids(config, with_hash=False)
        file = self.npy.npy if self.npy is not None else self.parquet[0]
        return _without_positions(((i, (file, r)) for i, r in zip(ids, rows.tolist())),
                                  self.dropped)

    def _candidate_ids(self, config: DedupConfig, with_hash: bool):
        if self.npy is not None:
            ids = read_npy_ids(self.npy)
            return ids, [None] * len(ids), np.arange(self.npy.start, self.npy.stop)
        return read_candidate_ids(self.parquet, config, with_hash, self.min_clip_score)

    def decode(self, config: DedupConfig) -> Decoded:
        """Every candidate row, decoded and checked (the dropped ones too)."""
        if self.npy is not None:
            return read_npy_chunk(self.npy)
        return read_parquet_chunk(self.parquet, self.dim, config, self.min_clip_score)

    def load(self, config: DedupConfig, stage_with: Optional[Callable] = None
             ) -> Tuple[List[str], np.ndarray]:
        """(ids, vectors float32 (n, d)) of the candidate rows of this chunk, exact
        duplicates included (callers drop `excluded`, keeping row numbers stable), the
        `dropped` rows not.

        A chunk is decoded once in the staged transport: the row check (`CheckRowsFn`)
        writes its valid vectors to the staging dir, and later loads read that raw file
        (`stage_with(write_staged, path, vectors)` stages a decoded chunk here instead). The
        assign step, the last to load, stages them again in cluster order
        (`staged_by_cluster`) and drops this copy.
        """
        staged = self.staged_copy(config)
        if staged and FileSystems.exists(staged):
            ids = [i for i, _ in self.ids(config, with_hash=False)]
            return ids, read_staged_rows(staged, self.dim, None)
        ids, vectors = self.decode(config).without(self.dropped)
        if staged and stage_with is not None:
            stage_with(write_staged, staged, vectors)
        return ids, vectors

    def staged_copy(self, config: DedupConfig) -> Optional[str]:
        """Where this chunk's vectors are (or will be) staged; None when not staging."""
        if config.transport != STAGED:
            return None
        return FileSystems.join(config.staging_dir, f"chunk-{self.name}.f32")

    def staged_by_cluster(self, config: DedupConfig) -> Optional[str]:
        """Where the assign step stages this chunk's candidates sorted by cluster, so that
        the rows of one (chunk, cluster) are one run of the file; None when not staging."""
        staged = self.staged_copy(config)
        return staged[: -len(".f32")] + ".by-cluster.f32" if staged else None


def _without_positions(items, positions: Sequence[int]):
    if not positions:
        return items
    skip = set(positions)
    return (item for k, item in enumerate(items) if k not in skip)


def _candidate_rows(ref: Tuple[str, int], columns: List[str], optional: Sequence[str] = (),
                    min_clip_score: Optional[float] = None):
    """(table of `columns` and those of `optional` the file has, each row's number in the
    file) of a row group's dedup candidates.

    `embed` writes every embedded sample, with a `passed_filters` column: only the rows where
    it is true are candidates (the same set `run` deduplicates). With `min_clip_score`, also
    only the rows whose `clip_score` is at least that (a null score is not)."""
    from beam_curator.errors import OptionError

    path, row_group = ref
    with FileSystems.open(path) as handle:
        parquet = pq.ParquetFile(handle)
        names = parquet.schema_arrow.names
        filtered = "passed_filters" in names
        if min_clip_score is not None and "clip_score" not in names:
            raise OptionError(f"{path} has no clip_score column, so no row can be held to "
                              f"a CLIP score of {min_clip_score}: embed with the CLIP score "
                              "on, or leave --clip_score_threshold out.")
        scored = ["clip_score"] if min_clip_score is not None else []
        table = parquet.read_row_group(
            row_group, columns=columns + [c for c in optional if c in names]
            + (["passed_filters"] if filtered else []) + scored)
        first = sum(parquet.metadata.row_group(g).num_rows for g in range(row_group))
    rows = np.arange(first, first + table.num_rows, dtype=np.int64)
    keep = None
    if filtered:
        keep = pc.fill_null(table.column("passed_filters"), False)
    if min_clip_score is not None:
        high = pc.fill_null(pc.greater_equal(table.column("clip_score"),
                                             pa.scalar(min_clip_score, pa.float32())), False)
        keep = high if keep is None else pc.and_(keep, high)
        table = table.drop_columns(scored)
    if keep is not None:
        keep = keep.to_numpy(zero_copy_only=False)
        table, rows = table.filter(keep), rows[keep]
    return table, rows


def read_parquet_chunk(ref: Tuple[str, int], dim: int, config: DedupConfig,
                       min_clip_score: Optional[float] = None) -> Decoded:
    """A row group's candidates, decoded and checked. A row whose length is not `dim` (0:
    the first row's) is a corrupt or mixed file: refused, naming the file and row."""
    from beam_curator.errors import OptionError

    table, rows = _candidate_rows(ref, [config.id_column, config.embedding_column],
                                  min_clip_score=min_clip_score)
    ids = table.column(config.id_column).to_pylist()
    column = table.column(config.embedding_column)
    try:
        vectors, null = list_column_rows(column, dim or None)
    except RowLengthError as exc:
        raise OptionError(
            f"{ref[0]} row {int(rows[exc.row])}: its {config.embedding_column!r} holds "
            f"{exc.length} values, but the embeddings are {exc.dim}-d (the first row read "
            "says so): every row needs the same dimension. Re-embed that file, or leave it "
            "out of --embeddings.") from None
    half = pa.types.is_float16(column.type.value_type)
    vectors, reasons, off = unit_rows(vectors, FLOAT16_TOLERANCE if half else UNIT_TOLERANCE)
    reasons[null] = REASONS.index(NULL_EMBEDDING)
    return _decoded(ids, vectors, reasons, off, ref[0], rows)


def _decoded(ids, vectors, reasons, off, file, rows) -> Decoded:
    """Decoded, with null ids marked (a row needs an id to be answered for)."""
    reasons[np.array([i is None for i in ids], dtype=bool)] = REASONS.index(NULL_ID)
    normalized = int(np.count_nonzero(off & (reasons == 0)))
    return Decoded(ids, vectors, reasons, normalized, file, rows)


class RowLengthError(ValueError):
    """A row of an embedding column whose length is not the dimension."""

    def __init__(self, row: int, length: int, dim: int):
        super().__init__(f"row {row} holds {length} values, not {dim}: every row needs the "
                         "same dimension")
        self.row, self.length, self.dim = row, length, dim


def list_column_rows(column, dim: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """A list<float> column -> ((n, dim) float32 with null rows zero, null mask), without a
    Python float per value. Every non-null row must hold `dim` values (None: as many as the
    first): the lengths come from the list offsets, and a RowLengthError names the first row
    that differs (a reshape of the flat values would turn such rows into garbage vectors)."""
    column = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    null = column.is_null().to_numpy(zero_copy_only=False)
    lengths = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False)
    if dim is None:
        present = lengths[~null]
        dim = int(present[0]) if present.size else 0
    wrong = np.flatnonzero(~null & (lengths != dim))
    if wrong.size:
        raise RowLengthError(int(wrong[0]), int(lengths[wrong[0]]), dim)
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if not null.any():
        return flat.reshape(len(column), dim), null
    vectors = np.zeros((len(column), dim), dtype=np.float32)
    vectors[~null] = flat.reshape(-1, dim)
    return vectors, null


def list_column_to_numpy(column, dim: Optional[int] = None) -> np.ndarray:
    """A list<float> column -> (n, d) float32 (null rows zero; see `list_column_rows`)."""
    return list_column_rows(column, dim)[0]


_STAGE_WRITE_ROWS = 1024   # rows gathered per write when reordering: ~3 MB at 768-d


def write_staged(path: str, vectors: np.ndarray, order: Optional[np.ndarray] = None) -> str:
    """The vectors (rows `order` in that order, when given) as raw float32.

    Written from the array itself, and a reordering gathered through one small buffer: a
    copy of the whole chunk costs a fresh allocation's page faults (~10 ms per 25 MB here),
    twice per chunk in a 1M-row dedup.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)

    def write(stream):
        if order is None:
            stream.write(memoryview(vectors.reshape(-1)).cast("B"))
            return
        buffer = np.empty((min(len(order), _STAGE_WRITE_ROWS), vectors.shape[1]), np.float32)
        for start in range(0, len(order), _STAGE_WRITE_ROWS):
            rows = order[start:start + _STAGE_WRITE_ROWS]
            part = buffer[:len(rows)]
            np.take(vectors, rows, axis=0, out=part, mode="clip")   # "raise" buffers `out`
            stream.write(memoryview(part.reshape(-1)).cast("B"))

    write_atomically(path, write)
    return path


def discard(path: str) -> None:
    """Delete a file or directory that may not exist (a retried step may already have
    deleted it)."""
    if FileSystems.exists(path):
        FileSystems.delete([path])


def write_sample(path: str, ids: Sequence[str], vectors: np.ndarray) -> str:
    """A chunk's k-means sample rows as one .npz (ids and float32 vectors); returns path."""
    buffer = io.BytesIO()
    np.savez(buffer, ids=np.asarray(ids, dtype=str),
             vectors=np.ascontiguousarray(vectors, dtype=np.float32))
    data = buffer.getvalue()
    write_atomically(path, lambda stream: stream.write(data))
    return path


def read_sample(path: str) -> Tuple[List[str], np.ndarray]:
    with FileSystems.open(path) as handle:
        with np.load(io.BytesIO(handle.read())) as npz:
            return npz["ids"].tolist(), npz["vectors"]


def read_staged_rows(path: str, dim: int, rows: Optional[Sequence[int]]) -> np.ndarray:
    """Rows (in the order given; None = all) of a staged float32 file.

    Local files are read with one positioned read per run of consecutive rows, straight into
    the result: a memory map per call cost ~0.1 ms (a 1M-row dedup makes ~100k such calls),
    and mapped pages would count in this process's RSS; read pages stay in the page cache.
    """
    local = path[7:] if path.startswith("file://") else path
    if "://" in local:
        with FileSystems.open(path) as handle:
            array = np.frombuffer(handle.read(), dtype=np.float32).reshape(-1, dim)
        return array if rows is None else array[np.asarray(rows, dtype=np.int64)]
    if rows is None:
        return np.fromfile(local, dtype=np.float32).reshape(-1, dim)
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return np.zeros((0, dim), dtype=np.float32)
    order = np.argsort(rows, kind="stable")
    wanted = rows[order]
    found = np.empty((rows.size, dim), dtype=np.float32)
    row_bytes = dim * 4
    runs = np.flatnonzero(np.diff(wanted) != 1) + 1
    buffer = memoryview(found.reshape(-1).view(np.uint8))
    fd = os.open(local, os.O_RDONLY)
    try:
        for start, stop in zip([0, *runs.tolist()], [*runs.tolist(), rows.size]):
            size = (stop - start) * row_bytes
            got = os.preadv(fd, [buffer[start * row_bytes:stop * row_bytes]],
                            int(wanted[start]) * row_bytes)
            if got != size:
                raise OSError(f"{path}: rows {wanted[start]}..{wanted[stop - 1]} are past "
                              "its end (a staged file was truncated or replaced)")
    finally:
        os.close(fd)
    out = np.empty_like(found)
    out[order] = found
    return out


def read_candidate_ids(ref: Tuple[str, int], config: DedupConfig, with_hash: bool,
                       min_clip_score: Optional[float] = None):
    """(ids, content hashes or Nones, rows in the file) of a row group's candidates, without
    the vectors."""
    table, rows = _candidate_rows(ref, [config.id_column],
                                  ["content_hash"] if with_hash else [], min_clip_score)
    ids = table.column(config.id_column).to_pylist()
    hashes = (table.column("content_hash").to_pylist() if "content_hash" in table.column_names
              else [None] * len(ids))
    return ids, hashes, rows


def count_candidates(chunk: Chunk, config: DedupConfig) -> int:
    """Candidates of the semantic pass in this chunk (exact duplicates and invalid rows not
    counted)."""
    left_out = len(chunk.excluded) + len(chunk.dropped)
    if chunk.npy is not None:
        return chunk.npy.stop - chunk.npy.start - left_out
    path, row_group = chunk.parquet
    with FileSystems.open(path) as handle:
        parquet = pq.ParquetFile(handle)
        if ("passed_filters" not in parquet.schema_arrow.names
                and chunk.min_clip_score is None):   # every row is a candidate
            return parquet.metadata.row_group(row_group).num_rows - left_out
    return sum(1 for _ in chunk.ids(config, with_hash=False)) - len(chunk.excluded)


# ---- the input: parquet files -> row-group chunks -------------------------------------------

def embeddings_schema(path: str, config: DedupConfig) -> Tuple[int, bool]:
    """(dim, has content_hash) of one embeddings file: dim is the first non-null row's length
    (0: no such row). Refuses columns dedup cannot read, naming the fix."""
    with FileSystems.open(path) as handle:
        parquet = pq.ParquetFile(handle)
        check_columns(path, parquet.schema_arrow, config)
        return first_dim(parquet, config), "content_hash" in parquet.schema_arrow.names


def check_columns(path: str, schema, config: DedupConfig) -> None:
    """The id column holds strings and the embedding column a list of floats per row."""
    from beam_curator.errors import OptionError

    names = schema.names
    for column in (config.id_column, config.embedding_column):
        if column not in names:
            raise OptionError(
                f"{path} has no column {column!r} (columns: {names}): set --id_column "
                "/ --embedding_column to the names your file uses.")
    id_type = schema.field(config.id_column).type
    if not (pa.types.is_string(id_type) or pa.types.is_large_string(id_type)):
        raise OptionError(
            f"{path}: the id column {config.id_column!r} holds {id_type}, not strings (dedup "
            "answers by sample id, the string `remove` matches): write the ids as strings, "
            "or point --id_column at a string column.")
    vector_type = schema.field(config.embedding_column).type
    is_list = (pa.types.is_list(vector_type) or pa.types.is_large_list(vector_type)
               or pa.types.is_fixed_size_list(vector_type))
    if not (is_list and pa.types.is_floating(vector_type.value_type)):
        raise OptionError(
            f"{path}: the embedding column {config.embedding_column!r} holds {vector_type}, "
            "not a list of floats per row: write each embedding as list<float32>, or point "
            "--embedding_column at such a column.")


def first_dim(parquet: pq.ParquetFile, config: DedupConfig) -> int:
    """The length of the first non-null embedding (a fixed-size list's from the schema)."""
    vector_type = parquet.schema_arrow.field(config.embedding_column).type
    if pa.types.is_fixed_size_list(vector_type):
        return vector_type.list_size
    for rg in range(parquet.metadata.num_row_groups):
        if parquet.metadata.row_group(rg).num_rows:
            column = parquet.read_row_group(rg, columns=[config.embedding_column]).column(0)
            lengths = pc.drop_null(pc.list_value_length(column))
            if len(lengths):
                return int(lengths[0].as_py())
    return 0


def chunk_names(paths: Sequence[str]) -> dict:
    """A short, unique, stable name per embeddings file: its stem (the shard name for `run`'s
    own embeddings), or its position in the sorted list when two stems collide."""
    import posixpath

    stems = [posixpath.basename(p).rsplit(".", 1)[0] for p in paths]
    if len(set(stems)) == len(stems):
        return dict(zip(paths, stems))
    return {p: f"{i:06d}" for i, p in enumerate(sorted(paths))}


def row_group_chunks(path: str, name: str, dim: int, config: DedupConfig,
                     min_clip_score: Optional[float] = None) -> List[Chunk]:
    """One Chunk per row group of one file. Only the footer is read (and the first row, when
    `dim` is 0: not known when the graph was built); its columns are checked there, so a file
    dedup cannot read fails before any vector is. `min_clip_score`: see Chunk."""
    from beam_curator.errors import OptionError

    with FileSystems.open(path) as handle:
        parquet = pq.ParquetFile(handle)
        check_columns(path, parquet.schema_arrow, config)
        file_dim = first_dim(parquet, config) if not dim else 0
        vector_type = parquet.schema_arrow.field(config.embedding_column).type
        if dim and pa.types.is_fixed_size_list(vector_type) and vector_type.list_size != dim:
            raise OptionError(
                f"{path}: its embeddings are {vector_type.list_size}-d, the others {dim}-d: "
                "dedup compares embeddings of one model. Leave it out of --embeddings.")
        n_groups = parquet.metadata.num_row_groups
    return [Chunk(name=f"{name}-{rg:05d}", parquet=(path, rg), dim=dim or file_dim,
                  min_clip_score=min_clip_score)
            for rg in range(n_groups)]


# ---- clip-retrieval's layout: img_emb/img_emb_N.npy + metadata/metadata_N.parquet -------

NPY_CHUNK_ROWS = 65_536   # rows of one .npy per chunk: ~200 MB of float32 at 768-d


def clip_retrieval_pairs(directory: str) -> List[Tuple[str, str]]:
    """(npy, metadata parquet) pairs of a clip-retrieval `clip inference` output, matched by
    their number; [] when `directory` is not laid out that way."""
    from beam_curator.transforms.read import match_globs

    npys = match_globs(FileSystems.join(directory, "img_emb", "img_emb_*.npy"))
    if not npys:
        return []
    pairs, missing = [], []
    for npy in npys:
        number = npy.rsplit("img_emb_", 1)[1][: -len(".npy")]
        metadata = FileSystems.join(directory, "metadata", f"metadata_{number}.parquet")
        (pairs if FileSystems.exists(metadata) else missing).append((npy, metadata))
    if missing:
        from beam_curator.errors import OptionError

        raise OptionError(f"{missing[0][0]} has no {missing[0][1]}: clip-retrieval writes "
                          "the ids of img_emb_N.npy in metadata/metadata_N.parquet.")
    return pairs


def resolve_embeddings(pattern: str) -> Tuple[List[str], List[Tuple[str, str]]]:
    """--embeddings -> (parquet files, clip-retrieval (npy, metadata) pairs).

    Comma-separated parts; a part that is a directory means its clip-retrieval layout when it
    has `img_emb/`, else its `*.parquet` files.
    """
    files, pairs, _ = resolve_embeddings_sized(pattern)
    return files, pairs


def resolve_embeddings_sized(pattern: str) -> Tuple[List[str], List[Tuple[str, str]], int]:
    """`resolve_embeddings`, and the bytes of the vectors: parquet files as they are, .npy
    arrays twice (clip-retrieval writes float16; they travel as float32). What a runner's
    dedup tasks share between them (options.flink_parallelism_for).

    Every file is named by one spelling (`canonical_path`): two spellings of one file, or
    overlapping globs, read it once (twice, every row would be the duplicate of itself)."""
    from beam_curator.transforms.read import (
        canonical_path,
        is_directory,
        matched_sizes,
        split_globs,
    )

    def sizes(glob: str) -> dict:
        return {canonical_path(path): size for path, size in matched_sizes(glob).items()}

    files, pairs, npy_sizes = {}, [], {}
    for part in split_globs(pattern):
        if is_directory(part):
            part = canonical_path(part)
            found = clip_retrieval_pairs(part)
            if found:
                pairs += found
                npy_sizes.update(sizes(FileSystems.join(part, "img_emb", "img_emb_*.npy")))
                continue
            part = FileSystems.join(part, "*.parquet")
        files.update(sizes(part))
    pairs = sorted({(canonical_path(npy), canonical_path(meta)) for npy, meta in pairs})
    return sorted(files), pairs, sum(files.values()) + 2 * sum(npy_sizes.values())


def _npy_header(handle) -> Tuple[np.dtype, Tuple[int, ...], int]:
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
    if fortran or len(shape) != 2:
        raise ValueError(f"expected a C-ordered 2-d array, got shape {shape}")
    return dtype, shape, handle.tell()


def npy_shape(path: str) -> Tuple[int, int]:
    """(rows, dim) of a 2-d float .npy; anything else is refused, naming the file."""
    from beam_curator.errors import OptionError

    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        try:
            dtype, shape, _ = _npy_header(handle)
        except ValueError as exc:
            raise OptionError(f"{path}: not a clip-retrieval embeddings .npy ({exc})") from None
    if not np.issubdtype(dtype, np.floating):
        raise OptionError(f"{path} holds {dtype}, not float embeddings: clip-retrieval "
                          "writes float16 (n, d) arrays.")
    return shape


def npy_id_column(metadata: str, id_column: str) -> str:
    """The id column of a clip-retrieval metadata file: the one asked for, or (the default
    `id` being absent) `key`, then `image_path`, which clip-retrieval always writes."""
    from beam_curator.errors import OptionError

    with FileSystems.open(metadata) as handle:
        names = pq.ParquetFile(handle).schema_arrow.names
    for candidate in ([id_column] + (["key", "image_path"] if id_column == "id" else [])):
        if candidate in names:
            return candidate
    raise OptionError(f"{metadata} has no column {id_column!r} (columns: {names}): set "
                      "--id_column to the one that holds your sample ids.")


def npy_chunks(npy: str, metadata: str, name: str, id_column: str) -> List[Chunk]:
    """One Chunk per NPY_CHUNK_ROWS rows of a clip-retrieval embeddings file."""
    n, dim = npy_shape(npy)
    with FileSystems.open(metadata) as handle:
        rows = pq.ParquetFile(handle).metadata.num_rows
    if rows != n:
        raise ValueError(f"{npy} has {n} rows but {metadata} has {rows}: they must match "
                         "row for row")
    return [Chunk(name=f"{name}-{start:09d}", dim=dim,
                  npy=NpyRows(npy, metadata, start, min(n, start + NPY_CHUNK_ROWS), id_column))
            for start in range(0, n, NPY_CHUNK_ROWS)]


def read_npy_chunk(rows: NpyRows) -> Decoded:
    """The rows as float32, every one re-normalised (clip-retrieval stores float16, whose
    rounding leaves norms ~1e-3 away from 1), and checked."""
    with FileSystems.open(rows.npy, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        dtype, (_, dim), offset = _npy_header(handle)
        handle.seek(offset + rows.start * dim * dtype.itemsize)
        data = handle.read((rows.stop - rows.start) * dim * dtype.itemsize)
    vectors = np.frombuffer(data, dtype=dtype).reshape(-1, dim).astype(np.float32)
    tolerance = FLOAT16_TOLERANCE if dtype.itemsize < 4 else UNIT_TOLERANCE
    vectors, reasons, off = unit_rows(vectors, tolerance, every_row=True)
    return _decoded(read_npy_ids(rows), vectors, reasons, off, rows.npy,
                    np.arange(rows.start, rows.stop, dtype=np.int64))


def read_npy_ids(rows: NpyRows) -> List[Optional[str]]:
    with FileSystems.open(rows.metadata) as handle:
        column = pq.read_table(handle, columns=[rows.id_column]).column(0)
    return [None if v is None else str(v)
            for v in column.slice(rows.start, rows.stop - rows.start).to_pylist()]


# ---- members: what the GroupByKey per cluster carries -------------------------------------

@dataclasses.dataclass(frozen=True)
class Members:
    """Columns of some members of one cluster or bin: one Beam element per (chunk, bin) or
    (chunk, block), so the shuffle moves a few arrays instead of one pickled object per
    sample.

    Vectors come inline (`vectors`, shuffle transport) or as references: `rows[i]` of the
    staged file `paths[path_index[i]]` (staged transport). `cluster` is set where one element
    carries several whole clusters (a bin of small clusters: `blocks.pack_clusters`).
    """

    ids: Tuple[str, ...]
    cos_dist: np.ndarray                  # float32, to the HOME centroid (the rank priority)
    l2_dist: np.ndarray                   # float32
    border: np.ndarray                    # bool: a second membership (--border_margin)
    vectors: Optional[np.ndarray] = None
    dim: int = 0                          # of the staged rows (files hold raw float32)
    paths: Tuple[str, ...] = ()
    path_index: Optional[np.ndarray] = None
    rows: Optional[np.ndarray] = None
    cluster: Optional[np.ndarray] = None  # int64 per member (bins only)

    def __len__(self) -> int:
        return len(self.ids)

    def __reduce__(self):
        """Pickled with its per-member columns as one bytes: Beam encodes one Members per
        (chunk, bin), and pickling five or six small arrays one by one made encode + decode
        ~90 µs per element (~50 µs packed). The vectors stay a pickled array (no copy)."""
        columns = [getattr(self, name) for name in _PACKED_COLUMNS]
        for name, column in zip(_PACKED_COLUMNS, columns):
            if column is not None and column.shape != (len(self.ids),):
                raise ValueError(f"Members.{name} has shape {column.shape}, not "
                                 f"({len(self.ids)},)")
        layout = tuple(None if c is None else c.dtype.str for c in columns)
        blob = b"".join(np.ascontiguousarray(c).tobytes() for c in columns if c is not None)
        return _unpack_members, (self.ids, self.vectors, self.dim, self.paths, layout, blob)

    def take(self, index) -> "Members":
        index = np.asarray(index, dtype=np.int64)
        pick = lambda a: None if a is None else a[index]   # noqa: E731
        return Members(
            ids=tuple(self.ids[i] for i in index), cos_dist=self.cos_dist[index],
            l2_dist=self.l2_dist[index], border=self.border[index],
            vectors=pick(self.vectors), dim=self.dim, paths=self.paths,
            path_index=pick(self.path_index), rows=pick(self.rows), cluster=pick(self.cluster))

    @staticmethod
    def concat(parts: Sequence["Members"]) -> "Members":
        parts = [p for p in parts if len(p)]
        if len(parts) == 1:
            return parts[0]
        cat = lambda name: np.concatenate([getattr(p, name) for p in parts])   # noqa: E731
        paths, path_index = (), None
        if parts[0].rows is not None:
            paths = tuple(sorted({path for p in parts for path in p.paths}))
            where = {path: i for i, path in enumerate(paths)}
            path_index = np.concatenate([
                np.array([where[path] for path in p.paths], dtype=np.int32)[p.path_index]
                for p in parts])
        return Members(
            ids=tuple(i for p in parts for i in p.ids), cos_dist=cat("cos_dist"),
            l2_dist=cat("l2_dist"), border=cat("border"),
            vectors=cat("vectors") if parts[0].vectors is not None else None,
            dim=parts[0].dim,
            paths=paths, path_index=path_index,
            rows=cat("rows") if parts[0].rows is not None else None,
            cluster=cat("cluster") if parts[0].cluster is not None else None)

    def load_vectors(self) -> np.ndarray:
        if self.vectors is not None:
            return self.vectors
        out = np.empty((len(self), self.dim), dtype=np.float32)
        for p, path in enumerate(self.paths):
            where = np.flatnonzero(self.path_index == p)
            if where.size:
                out[where] = read_staged_rows(path, self.dim, self.rows[where])
        return out

    def with_vectors(self) -> "Members":
        """The same members with their vectors inline (staged rows read once, in runs)."""
        if self.vectors is not None:
            return self
        return dataclasses.replace(self, vectors=self.load_vectors(), paths=(),
                                   path_index=None, rows=None)

    def by_cluster(self):
        """(cluster, its members in their order here, without the cluster column) for each
        cluster of a bin, in cluster order."""
        for cluster, positions in positions_by_cluster(self.cluster):
            yield cluster, dataclasses.replace(self.take(positions), cluster=None)


_PACKED_COLUMNS = ("cos_dist", "l2_dist", "border", "path_index", "rows", "cluster")


def _unpack_members(ids, vectors, dim, paths, layout, blob) -> Members:
    """Members.__reduce__'s inverse (the columns are read-only views of `blob`)."""
    columns, offset = {}, 0
    for name, dtype in zip(_PACKED_COLUMNS, layout):
        if dtype is None:
            columns[name] = None
            continue
        columns[name] = np.frombuffer(blob, dtype=dtype, count=len(ids), offset=offset)
        offset += columns[name].nbytes
    return Members(ids=ids, vectors=vectors, dim=dim, paths=paths, **columns)


@dataclasses.dataclass(frozen=True)
class Decisions:
    """SemDeDup's answer for some members of one cluster (all of it, or one block)."""

    cluster: int
    members: Members                      # vectors dropped
    max_ids: Tuple[str, ...]
    cosine_sim: np.ndarray                # float32
    is_duplicate: np.ndarray              # bool

    def __len__(self) -> int:
        return len(self.members)

    def rows(self):
        """(id, max_id, cosine_sim, is_duplicate) per member."""
        return zip(self.members.ids, self.max_ids, self.cosine_sim.tolist(),
                   self.is_duplicate.tolist())


def without_vectors(members: Members) -> Members:
    return dataclasses.replace(members, vectors=None, paths=(), path_index=None, rows=None,
                               cluster=None)


@dataclasses.dataclass(frozen=True)
class Assigned:
    """A chunk's candidate rows and their cluster memberships (no vectors: they are read
    again where they are routed, so they never wait behind the cluster-size side input).

    `members` holds every candidate row (`rows`: its row in the chunk's candidates, which is
    also its row in the staged file); `memberships` are (clusters, member indices, border):
    the home clusters, and with --border_margin the second ones.
    """

    chunk: Chunk
    members: Members
    memberships: Tuple[Tuple[np.ndarray, np.ndarray, bool], ...]

    def cluster_counts(self):
        for clusters, _, _ in self.memberships:
            values, counts = np.unique(clusters, return_counts=True)
            yield from zip(values.tolist(), counts.tolist())


@dataclasses.dataclass(frozen=True)
class BlockPartial:
    """One block pair's answer for the members of one block of a cluster: per member (in the
    block's rank order) the best earlier-ranked member found there. The diagonal pair also
    carries the block's members (without vectors), which the decisions are written from."""

    members: Optional[Members]
    sim: np.ndarray                       # float32, -inf = no earlier member seen
    source_primary: np.ndarray            # the best member's primary rank key
    source_id: np.ndarray                 # object array of str

    def merged(self, other: "BlockPartial") -> "BlockPartial":
        from beam_curator.dedup.blocks import merge_partials

        sim, primary, source = merge_partials(
            (self.sim, self.source_primary, self.source_id),
            (other.sim, other.source_primary, other.source_id))
        return BlockPartial(self.members if self.members is not None else other.members,
                            sim, primary, source)
