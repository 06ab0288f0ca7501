"""Writers: parquet files per shard, curated webdataset shards, summary.json.

Every file is written under a temporary name and renamed into place, and every file's content
is sorted, so a rerun of the same command writes byte-identical files and a failed run never
leaves a file that looks complete. summary.json is written last: it marks a finished run.
"""
from __future__ import annotations

import io
import tarfile
from typing import Callable, Iterable, List, Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from beam_curator.atomic import write_atomically


def embeddings_to_arrow(vectors: List[np.ndarray]) -> pa.Array:
    """(n, d) float32 rows -> list<float32> without a Python float per value."""
    if not vectors:
        return pa.array([], type=pa.list_(pa.float32()))
    lengths = np.fromiter((len(v) for v in vectors), dtype=np.int32, count=len(vectors))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = np.concatenate([np.asarray(v, dtype=np.float32) for v in vectors])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa.float32()))


def write_parquet(path: str, table: pa.Table, use_dictionary: bool = True) -> str:
    """`use_dictionary=False` for tables of unique strings (ids): dictionary pages only cost
    there (dedup's per-cluster files: ~40 % less time per file, ~30 % fewer bytes)."""
    def write(stream):
        pq.write_table(table, stream, compression="zstd", use_dictionary=use_dictionary)
    return write_atomically(path, write)


def rows_to_table(rows: List[dict], schema: pa.Schema, vector_column: Optional[str] = None
                  ) -> pa.Table:
    columns = {}
    for field in schema:
        values = [row.get(field.name) for row in rows]
        if field.name == vector_column:
            columns[field.name] = embeddings_to_arrow(values)
        else:
            columns[field.name] = pa.array(values, type=field.type)
    return pa.table(columns, schema=schema)


def _by_id(row: dict):
    return row["id"]


class WriteParquetByShardFn(beam.DoFn):
    """(shard, rows) -> DIR/<shard>.parquet, rows sorted (by id); emits the written path."""

    def __init__(self, directory: str, schema: pa.Schema, vector_column: Optional[str] = None,
                 sort_key: Callable[[dict], object] = _by_id):
        self._directory = directory
        self._schema = schema
        self._vector_column = vector_column
        self._sort_key = sort_key

    def process(self, shard_rows):
        shard, rows = shard_rows
        rows = sorted(rows, key=self._sort_key)
        table = rows_to_table(rows, self._schema, self._vector_column)
        yield write_parquet(FileSystems.join(self._directory, f"{shard}.parquet"), table)


class WriteParquetByShard(beam.PTransform):
    """(shard, row dict) -> one parquet file per shard under `directory`."""

    def __init__(self, directory: str, schema: pa.Schema, vector_column: Optional[str] = None,
                 sort_key: Callable[[dict], object] = _by_id):
        super().__init__()
        self._directory = directory
        self._schema = schema
        self._vector_column = vector_column
        self._sort_key = sort_key

    def expand(self, keyed_rows):
        return (keyed_rows
                | "GroupByShard" >> beam.GroupByKey()
                | "WriteParquet" >> beam.ParDo(WriteParquetByShardFn(
                    self._directory, self._schema, self._vector_column, self._sort_key)))


# ---- the public writers: samples/, errors/, embeddings/ ------------------------------------

class WriteSamples(beam.PTransform):
    """SampleResult -> OUTPUT/samples/<shard>.parquet (one row per sample, sorted by id).

    Emits the paths written. Columns: schema.SAMPLES_SCHEMA (id, shard, key, status, reason,
    scores, cluster, duplicate_of, cosine_sim, ...).

    Args:
      output_dir: the output directory (local, gs://, s3://).

    Example::

        results | WriteSamples("/tmp/out")
    """

    def __init__(self, output_dir: str):
        super().__init__()
        self._output_dir = output_dir

    def expand(self, results):
        from beam_curator import outputs
        from beam_curator.schema import SAMPLES_SCHEMA

        return (results
                | "SampleRows" >> beam.Map(lambda r: (r.info.shard, r.to_row()))
                | "WriteSamples" >> WriteParquetByShard(outputs.samples_dir(self._output_dir),
                                                        SAMPLES_SCHEMA))


def _error_row(item) -> dict:
    from beam_curator.schema import ErrorRecord

    if isinstance(item, ErrorRecord):
        return item.to_row()
    info = item.info
    return ErrorRecord(id=item.id, shard=info.shard, stage=item.stage or "",
                       reason=item.reason or "",
                       member=f"{info.key}.{info.image_ext}" if info.image_ext else None
                       ).to_row()


def _error_order(row: dict) -> tuple:
    return (row["id"] or "", row["member"] or "", row["reason"])


class WriteErrors(beam.PTransform):
    """Errors -> OUTPUT/errors/<shard>.parquet: shard-level ErrorRecords (id null) and
    SampleResults with status error (other statuses are ignored). Emits the paths written.

    Args:
      output_dir: the output directory.

    Example::

        (read.errors, results) | beam.Flatten() | WriteErrors("/tmp/out")
    """

    def __init__(self, output_dir: str):
        super().__init__()
        self._output_dir = output_dir

    def expand(self, items):
        from beam_curator import outputs
        from beam_curator.schema import ERROR, ERRORS_SCHEMA, ErrorRecord

        return (items
                | "OnlyErrors" >> beam.Filter(
                    lambda i: isinstance(i, ErrorRecord) or i.status == ERROR)
                | "ErrorRows" >> beam.Map(_error_row)
                | "ByShard" >> beam.Map(lambda row: (row["shard"], row))
                | "WriteErrors" >> WriteParquetByShard(outputs.errors_dir(self._output_dir),
                                                       ERRORS_SCHEMA, sort_key=_error_order))


def _embedding_row(element) -> tuple:
    """(SampleInfo | SampleResult, embedding) -> (shard, row); a SampleResult (a filtered
    sample) is written with passed_filters = false."""
    item, embedding = element
    info, passed = (item, True) if not hasattr(item, "info") else (item.info, False)
    return info.shard, {"id": info.id, "embedding": embedding,
                        "content_hash": info.content_hash, "passed_filters": passed,
                        "clip_score": info.clip_score}


class WriteEmbeddings(beam.PTransform):
    """(SampleInfo, embedding) -> OUTPUT/embeddings/<shard>.parquet; emits the paths written.

    Columns: id, embedding (list<float32>), content_hash, passed_filters (true for a
    SampleInfo, false for a (SampleResult, embedding) of a filtered sample), clip_score (null
    without a caption or with the score off): the input of
    `DeduplicateEmbeddings` and of `python -m beam_curator dedup`.

    Args:
      output_dir: the output directory.

    Example::

        scored | WriteEmbeddings("/tmp/out")
    """

    def __init__(self, output_dir: str):
        super().__init__()
        self._output_dir = output_dir

    def expand(self, embedded):
        from beam_curator import outputs
        from beam_curator.schema import EMBEDDINGS_SCHEMA

        return (embedded
                | "EmbeddingRows" >> beam.Map(_embedding_row)
                | "WriteEmbeddings" >> WriteParquetByShard(
                    outputs.embeddings_dir(self._output_dir), EMBEDDINGS_SCHEMA,
                    vector_column="embedding"))


# ---- curated webdataset shards --------------------------------------------------------------

def write_tar_members(stream, samples: Iterable) -> int:
    """Write samples' ORIGINAL image bytes and sidecars as a webdataset tar; returns the count.

    Member metadata is fixed (mtime 0, root, 0644) so that reruns are byte-identical.
    """
    count = 0
    with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for sample in samples:
            # Image first, then the sidecars in the order the source shard had them.
            fields = [(sample.image_ext, sample.image_bytes)] + list(sample.sidecars.items())
            for ext, data in fields:
                info = tarfile.TarInfo(name=f"{sample.key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
            count += 1
    return count


def write_curated_shard(path: str, samples: Iterable) -> int:
    """A `.tar.gz`/`.tgz` path is written gzip-compressed (mtime 0, no name in the header, so
    reruns are byte-identical), anything else as a plain tar."""
    import gzip

    from apache_beam.io.filesystem import CompressionTypes

    from beam_curator.transforms.read import GZIP_SUFFIXES

    # FileSystems.create already gzips a name ending in `.gz` (compression AUTO, zlib's
    # header: mtime 0); a `.tgz` is ours to compress.
    compress = (path.endswith(GZIP_SUFFIXES)
                and CompressionTypes.detect_compression_type(path) != CompressionTypes.GZIP)
    counter = {}

    def write(stream):
        if not compress:
            counter["n"] = write_tar_members(stream, samples)
            return
        # Level 6: the gzip command's default (Python's 9 is slower for ~1 % smaller).
        with gzip.GzipFile(filename="", mode="wb", fileobj=stream, mtime=0,
                           compresslevel=6) as packed:
            counter["n"] = write_tar_members(packed, samples)

    write_atomically(path, write)
    return counter["n"]
