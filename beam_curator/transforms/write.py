"""Writers: parquet files per shard, curated webdataset shards, summary.json.

Every file is written under a temporary name and renamed into place, and every file's content
is sorted, so a rerun of the same command writes byte-identical files and a failed run never
leaves a file that looks complete. summary.json is written last: it marks a finished run.
"""
from __future__ import annotations

import errno
import io
import json
import os
import tarfile
import uuid
from typing import Callable, Iterable, List, Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

TMP_PREFIX = ".tmp-"


def write_atomically(path: str, write: Callable[[object], None],
                     mime_type: str = "application/octet-stream") -> str:
    """Write through `write(stream)` to a temp name beside `path`, then rename into place.

    The temp name is unique per attempt (`.tmp-<random>-<name>`): a retried or speculative
    bundle writing the same file never shares a temp file with another attempt. A failed
    attempt deletes its temp file; whatever a killed worker leaves is removed by the next
    run's prepare_output and before summary.json is written.
    """
    directory, name = path.rsplit("/", 1) if "/" in path else ("", path)
    tmp_name = f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{name}"
    tmp = FileSystems.join(directory, tmp_name) if directory else tmp_name
    if directory:
        _mkdirs(directory)
    try:
        with FileSystems.create(tmp, mime_type=mime_type) as stream:
            write(stream)
        if FileSystems.exists(path):
            FileSystems.delete([path])
        FileSystems.rename([tmp], [path])
    except BaseException as exc:
        try:
            if FileSystems.exists(tmp):
                FileSystems.delete([tmp])
        except Exception:   # noqa: BLE001 - the original error is the one to report
            pass
        if _is_disk_full(exc):
            # Name the file: through Beam's wrapping the message is all that reaches the
            # user, and pyarrow's own message does not say which file it was writing.
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path) from exc
        raise
    return path


def _is_disk_full(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "[Errno 28]" in str(exc) or "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _mkdirs(directory: str) -> None:
    """mkdir -p that tolerates another worker creating the same directory at the same time."""
    if FileSystems.exists(directory):
        return
    try:
        FileSystems.mkdirs(directory)
    except IOError:
        if not FileSystems.exists(directory):
            raise


def embeddings_to_arrow(vectors: List[np.ndarray]) -> pa.Array:
    """(n, d) float32 rows -> list<float32> without a Python float per value."""
    if not vectors:
        return pa.array([], type=pa.list_(pa.float32()))
    lengths = np.fromiter((len(v) for v in vectors), dtype=np.int32, count=len(vectors))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = np.concatenate([np.asarray(v, dtype=np.float32) for v in vectors])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa.float32()))


def write_parquet(path: str, table: pa.Table) -> str:
    def write(stream):
        pq.write_table(table, stream, compression="zstd")
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
    counter = {}

    def write(stream):
        counter["n"] = write_tar_members(stream, samples)

    write_atomically(path, write)
    return counter["n"]


def write_json(path: str, payload: dict) -> str:
    data = (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode("utf-8")
    return write_atomically(path, lambda stream: stream.write(data))
