"""Dedup's input: embeddings files cut into `Chunk`s, and the rows of a chunk read and checked.

A `Chunk` names a batch of candidate rows and where they are: a `ParquetRowGroup` of an
embeddings parquet (the `dedup` command's input, or what `run` has just written) or
`NpyRows` of a clip-retrieval `img_emb/img_emb_N.npy`. Both kinds answer the same questions
(`candidate_ids`, `decode`, `count`), so no step of the graph asks which kind it holds.
`Decoded` is a chunk's rows as read, each with what is wrong with it (an `InvalidRow` is
counted and left out; a vector not of unit length is normalised).

Everything here is a module-level class or function: Beam pickles the elements.
"""
from __future__ import annotations

import dataclasses
from typing import FrozenSet, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from beam_curator.dedup.kmeans import load_centroids
from beam_curator.errors import OptionError
from beam_curator.transforms.semdedup.config import DedupConfig


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



# ---- chunks: a handful of rows and where they are ------------------------------------------

@dataclasses.dataclass(frozen=True)
class ParquetRowGroup:
    """One row group of an embeddings parquet. `min_clip_score`: only rows whose
    `clip_score` column is at least this are candidates (the keep-top-fraction threshold,
    known once the pool's scores are; None: no such condition)."""

    path: str
    row_group: int
    min_clip_score: Optional[float] = None

    @property
    def file(self) -> str:
        return self.path

    def candidate_ids(self, config: DedupConfig, with_hash: bool):
        """(ids, content hashes or Nones, each row's number in the file), no vectors."""
        table, rows = _candidate_rows(self, [config.id_column],
                                      ["content_hash"] if with_hash else [])
        ids = table.column(config.id_column).to_pylist()
        hashes = (table.column("content_hash").to_pylist()
                  if "content_hash" in table.column_names else [None] * len(ids))
        return ids, hashes, rows

    def decode(self, config: DedupConfig, dim: int) -> "Decoded":
        """The candidates, decoded and checked. A row whose length is not `dim` (0: the
        first row's) is a corrupt or mixed file: refused, naming the file and row."""
        table, rows = _candidate_rows(self, [config.id_column, config.embedding_column])
        ids = table.column(config.id_column).to_pylist()
        column = table.column(config.embedding_column)
        try:
            vectors, null = list_column_rows(column, dim or None)
        except RowLengthError as exc:
            raise OptionError(
                f"{self.path} row {int(rows[exc.row])}: its {config.embedding_column!r} holds "
                f"{exc.length} values, but the embeddings are {exc.dim}-d (the first row read "
                "says so): every row needs the same dimension. Re-embed that file, or leave it "
                "out of --embeddings.") from None
        half = pa.types.is_float16(column.type.value_type)
        vectors, reasons, off = unit_rows(vectors,
                                          FLOAT16_TOLERANCE if half else UNIT_TOLERANCE)
        reasons[null] = REASONS.index(NULL_EMBEDDING)
        return _decoded(ids, vectors, reasons, off, self.path, rows)

    def count(self, config: DedupConfig) -> int:
        """How many candidate rows (every row, unless a column filters them)."""
        with FileSystems.open(self.path) as handle:
            parquet = pq.ParquetFile(handle)
            if "passed_filters" not in parquet.schema_arrow.names and self.min_clip_score is None:
                return parquet.metadata.row_group(self.row_group).num_rows
        return len(self.candidate_ids(config, with_hash=False)[0])


@dataclasses.dataclass(frozen=True)
class NpyRows:
    """Rows [start, stop) of a clip-retrieval `img_emb/img_emb_N.npy`; the ids are the same
    rows of `metadata/metadata_N.parquet`."""

    npy: str
    metadata: str
    start: int
    stop: int
    id_column: str

    @property
    def file(self) -> str:
        return self.npy

    def candidate_ids(self, config: DedupConfig, with_hash: bool):
        ids = read_npy_ids(self)
        return ids, [None] * len(ids), np.arange(self.start, self.stop)

    def decode(self, config: DedupConfig, dim: int) -> "Decoded":
        return read_npy_chunk(self)

    def count(self, config: DedupConfig) -> int:
        return self.stop - self.start


# What a chunk's rows are to the dedup: the candidates it answers for, the rows of --reference
# (compared with, never answered for, never removed), or of --target (only their clusters
# count).
CANDIDATE, REFERENCE, TARGET = "candidate", "reference", "target"


@dataclasses.dataclass(frozen=True)
class Chunk:
    """A batch of embeddings: `source` says where (a ParquetRowGroup or NpyRows), `role`
    what they are to the dedup (CANDIDATE, REFERENCE or TARGET).
    `excluded`: its exact duplicates (not candidates of the semantic pass); `dropped`: the
    positions of its invalid rows among its candidates (set by the row check, the first step
    that reads the vectors; every later read leaves them out). `name` is unique in the run
    and names the chunk's scratch files and its exact-duplicate outputs."""

    name: str
    source: object              # ParquetRowGroup | NpyRows
    dim: int = 0
    excluded: FrozenSet[str] = frozenset()
    dropped: Tuple[int, ...] = ()
    role: str = CANDIDATE

    @property
    def file(self) -> str:
        return self.source.file

    @property
    def is_candidate(self) -> bool:
        return self.role == CANDIDATE

    def ids(self, config: DedupConfig, with_hash: bool):
        """(id, content_hash or None) of the candidate rows, without the vectors."""
        ids, hashes, _ = self.source.candidate_ids(config, with_hash)
        return _without_positions(zip(ids, hashes), self.dropped)

    def places(self, config: DedupConfig):
        """(id, (file, row in the file)) of the candidate rows: where each id was read."""
        ids, _, rows = self.source.candidate_ids(config, with_hash=False)
        file = self.file
        return _without_positions(((i, (file, r)) for i, r in zip(ids, rows.tolist())),
                                  self.dropped)

    def decode(self, config: DedupConfig) -> "Decoded":
        """Every candidate row, decoded and checked (the dropped ones too)."""
        return self.source.decode(config, self.dim)

    def count_candidates(self, config: DedupConfig) -> int:
        """Candidates of the semantic pass (exact duplicates and invalid rows not counted)."""
        return self.source.count(config) - len(self.excluded) - len(self.dropped)

def _without_positions(items, positions: Sequence[int]):
    if not positions:
        return items
    skip = set(positions)
    return (item for k, item in enumerate(items) if k not in skip)


def _candidate_rows(group: ParquetRowGroup, columns: List[str], optional: Sequence[str] = ()):
    """(table of `columns` and those of `optional` the file has, each row's number in the
    file) of a row group's dedup candidates.

    `embed` writes every embedded sample, with a `passed_filters` column: only the rows where
    it is true are candidates (the same set `run` deduplicates). With `min_clip_score`, also
    only the rows whose `clip_score` is at least that (a null score is not)."""
    path, row_group, min_clip_score = group.path, group.row_group, group.min_clip_score
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
                     min_clip_score: Optional[float] = None, role: str = CANDIDATE
                     ) -> List[Chunk]:
    """One Chunk per row group of one file. Only the footer is read (and the first row, when
    `dim` is 0: not known when the graph was built); its columns are checked there, so a file
    dedup cannot read fails before any vector is. `min_clip_score`: see ParquetRowGroup."""
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
    return [Chunk(name=f"{name}-{rg:05d}", source=ParquetRowGroup(path, rg, min_clip_score),
                  dim=dim or file_dim, role=role)
            for rg in range(n_groups)]


# ---- clip-retrieval's layout: img_emb/img_emb_N.npy + metadata/metadata_N.parquet -------
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
    dedup tasks share between them (flink_tasks.tasks_for_embeddings).

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
    with FileSystems.open(metadata) as handle:
        names = pq.ParquetFile(handle).schema_arrow.names
    for candidate in ([id_column] + (["key", "image_path"] if id_column == "id" else [])):
        if candidate in names:
            return candidate
    raise OptionError(f"{metadata} has no column {id_column!r} (columns: {names}): set "
                      "--id_column to the one that holds your sample ids.")


def npy_chunks(npy: str, metadata: str, name: str, id_column: str, role: str = CANDIDATE
               ) -> List[Chunk]:
    """One Chunk per NPY_CHUNK_ROWS rows of a clip-retrieval embeddings file."""
    n, dim = npy_shape(npy)
    with FileSystems.open(metadata) as handle:
        rows = pq.ParquetFile(handle).metadata.num_rows
    if rows != n:
        raise ValueError(f"{npy} has {n} rows but {metadata} has {rows}: they must match "
                         "row for row")
    return [Chunk(name=f"{name}-{start:09d}", dim=dim, role=role,
                  source=NpyRows(npy, metadata, start, min(n, start + NPY_CHUNK_ROWS), id_column))
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




# ---- checked before any work ------------------------------------------------------------

def check_embedding_sources(paths: Sequence[str], npy_pairs: Sequence[Tuple[str, str]],
                            config: DedupConfig) -> Tuple[int, bool]:
    """(dim, every file has content_hash) of resolved embeddings, checked before any work
    from what is cheap to read: the first clip-retrieval header; the footers (columns and
    their types) of the parquet files up to the first with an embedding, whose first row
    gives the dim; and the --centroids file against it. Each file's footer is checked again
    where its chunks are made, and every row where it is decoded."""
    dim, has_hash, where = 0, not npy_pairs, None   # clip-retrieval writes no content hash
    for npy, _ in npy_pairs[:1]:
        dim, where = npy_shape(npy)[1], npy
    for path in paths:
        file_dim, file_hash = embeddings_schema(path, config)
        has_hash = has_hash and file_hash
        if file_dim:
            if dim and file_dim != dim:
                raise OptionError(f"{path} holds {file_dim}-d embeddings, {where} {dim}-d: "
                                  "dedup compares embeddings of one model. Leave one out of "
                                  "--embeddings.")
            dim = file_dim
            break
    if not dim:
        raise OptionError(
            f"--embeddings: the {len(paths) + len(npy_pairs)} file(s) it matches hold no "
            "embedding (no rows, or only null embeddings). Point it at the embeddings of an "
            "`embed` run (OUTPUT/embeddings) or another file with rows.")
    if config.centroids:
        check_centroids(config.centroids, dim)
    return dim, has_hash


def check_centroids(path: str, dim: int) -> None:
    """--centroids must be a plain (k, dim) float .npy with finite, non-zero rows."""
    try:
        load_centroids(path, dim)
    except FileNotFoundError:
        raise OptionError(
            f"--centroids {path} does not exist. Point it at a centroids .npy (e.g. "
            "OUTPUT/dedup/centroids.npy of an earlier run), or leave it out to train them."
        ) from None
    except ValueError as exc:
        reason = " ".join(str(exc).split())   # one line
        raise OptionError(
            f"--centroids: {reason}. Pass the centroids.npy of a run on {dim}-d embeddings "
            "like these (OUTPUT/dedup/centroids.npy), or leave --centroids out to train "
            "them.") from None


class EmbeddingsFile(NamedTuple):
    """One input file of the `dedup` command: an embeddings parquet, or a clip-retrieval
    .npy with its metadata parquet (the ids, from `id_column`)."""

    path: str
    chunk_prefix: str              # chunk_names(): unique in the run
    metadata: Optional[str] = None
    id_column: Optional[str] = None
    role: str = CANDIDATE

    def chunks(self, dim: int, config: DedupConfig,
               min_clip_score: Optional[float] = None) -> List[Chunk]:
        """Its chunks; `min_clip_score` holds candidates to a CLIP score (never references
        or targets: they are other sets)."""
        if self.role != CANDIDATE:
            min_clip_score = None
        if self.metadata is None:
            return row_group_chunks(self.path, self.chunk_prefix, dim, config, min_clip_score,
                                    self.role)
        chunks = npy_chunks(self.path, self.metadata, self.chunk_prefix, self.id_column,
                            self.role)
        if chunks and chunks[0].dim != dim:
            raise OptionError(f"{self.path} holds {chunks[0].dim}-d embeddings, the others "
                              f"{dim}-d: dedup compares embeddings of one model. Leave it out "
                              "of --embeddings.")
        return chunks


def embeddings_files(paths: Sequence[str], npy_pairs: Sequence[Tuple[str, str]],
                     config: DedupConfig, role: str = CANDIDATE) -> List[EmbeddingsFile]:
    """Resolved files -> EmbeddingsFile each, with chunk names unique in the run (those of
    other roles prefixed by theirs)."""
    names = chunk_names(list(paths) + [npy for npy, _ in npy_pairs])
    prefix = "" if role == CANDIDATE else f"{role}-"
    files = [EmbeddingsFile(p, prefix + names[p], role=role) for p in paths]
    if npy_pairs:
        id_column = npy_id_column(npy_pairs[0][1], config.id_column)
        files += [EmbeddingsFile(npy, prefix + names[npy], meta, id_column, role)
                  for npy, meta in npy_pairs]
    return files
