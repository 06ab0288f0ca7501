"""Where dedup's vectors are between the row check and the pairwise step: one owner.

A `VectorStore` is to dedup's DoFns what a `ModelHandler` is to RunInference: each step asks
it for vectors (`load`, `read`) or tells it where they go next (`checked`, `placed`,
`routed`), and never asks how they travel. Two stores, chosen once by
--dedup_vector_transport:

* `StagedVectors` (a local --output that every worker sees: one machine, or a mount shared
  at the same path): the row check writes each chunk's valid vectors as raw float32 under
  dedup/_staging/; the assign step rewrites them in cluster
  order and deletes the first copy; members cross the GroupByKey as (file, row) references
  and the pairwise step reads one run of rows per (chunk, bin).
* `ShuffledVectors` (anywhere): vectors are decoded from the embeddings where needed and
  cross the GroupByKey once, as float32 arrays inside `Members`.

The k-means sample files live under the same staging directory for both, and the store that
writes them reads and deletes them (`discard_all`, once every output is written).

Both stores thus need workers that see the launcher's --output. That is checked, not
assumed: the launcher writes a marker named by a fresh token (`mark_staging`, at graph
construction) and each worker's copy of the store looks for it before it first touches the
staging directory (`StagingNotSharedError` otherwise). So a worker on a host that does not share the
output fails at the first step, naming the fix, and never reads a stale file of another run
left on its own disk.
"""
from __future__ import annotations

import dataclasses
import io
import os
import socket
import time
import uuid
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from apache_beam.io.filesystems import FileSystems

from beam_curator.atomic import write_atomically
from beam_curator.defaults import STAGED
from beam_curator.transforms.semdedup.config import DedupConfig
from beam_curator.transforms.semdedup.records import Assigned, Members
from beam_curator.transforms.semdedup.sources import Chunk, Decoded

# A write handed to the DoFn's write-behind thread: submit(function, *args).
Submit = Callable[..., None]


class StagingNotSharedError(RuntimeError):
    """A worker does not see the launcher's --output (its staging marker is not there)."""


def mark_staging(config: DedupConfig) -> DedupConfig:
    """The launcher's half of the shared-output check: writes a marker named by a fresh token
    into the staging directory and returns the config that carries the token to the
    workers. Called once per dedup graph, where it is built."""
    marked = dataclasses.replace(config, staging_run=uuid.uuid4().hex)
    note = f"written by the launcher on {socket.gethostname()} at {time.ctime()}\n".encode()
    write_atomically(marked.staging_marker, lambda stream: stream.write(note))
    return marked


class VectorStore:
    """The interface, and what both stores share (sample files, reading members)."""

    def __init__(self, config: DedupConfig):
        self._config = config
        self._marker_seen = False   # per copy: each DoFn instance unpickles its own store

    def _check_shared(self) -> None:
        """Before this copy of the store first touches the staging directory (one look per
        DoFn instance, not per element): the launcher's marker is there (see the module
        docstring), else a StagingNotSharedError naming the fix."""
        if self._marker_seen or self._config.staging_run is None:
            return
        marker = self._config.staging_marker
        if not FileSystems.exists(marker):
            raise StagingNotSharedError(
                f"this worker ({socket.gethostname()}) does not see the --output the "
                f"launcher wrote: {marker} is missing. Dedup keeps scratch files under "
                f"{self._config.staging_dir} that every worker writes and reads, so every "
                "worker must see --output at the same path as the launcher. Use an --output "
                "all of them share (gs://, s3://, or a mount such as NFS at the same path on "
                "every host), or run on one machine.")
        self._marker_seen = True

    # -- the row check: the first step that decodes a chunk --------------------------------
    def checked(self, chunk: Chunk, decoded: Decoded, submit: Submit) -> None:
        """A chunk has just been decoded and checked (`chunk.dropped` set)."""

    # -- the sample and assign steps: a chunk's candidate vectors ---------------------------
    def load(self, chunk: Chunk) -> Tuple[List[str], np.ndarray]:
        """(ids, float32 (n, d) vectors) of the chunk's candidates: exact copies included
        (callers leave out `excluded`, keeping row numbers stable), dropped rows not."""
        return chunk.decode(self._config).without(chunk.dropped)

    def placed(self, chunk: Chunk, vectors: np.ndarray, clusters: np.ndarray,
               kept: np.ndarray, submit: Submit) -> dict:
        """The assign step has the chunk's semantic candidates (`vectors`: rows `kept` of
        `load`'s, exact copies out) and their home clusters: returns the `Members` fields
        (paths, path_index, rows) that say where the later steps find each one's vector."""
        return dict(rows=kept)

    # -- the route step: members about to cross the GroupByKey ------------------------------
    def routed(self, assigned: Assigned) -> Members:
        return assigned.members

    # -- the pairwise step ----------------------------------------------------------------
    def read(self, members: Members) -> np.ndarray:
        """The members' vectors, in their order."""
        if members.vectors is not None:
            return members.vectors
        self._check_shared()
        out = np.empty((len(members), members.dim), dtype=np.float32)
        for p, path in enumerate(members.paths):
            where = np.flatnonzero(members.path_index == p)
            if where.size:
                out[where] = read_staged_rows(path, members.dim, members.rows[where])
        return out

    def with_vectors(self, members: Members) -> Members:
        """The same members with their vectors inline (staged rows read once, in runs)."""
        if members.vectors is not None:
            return members
        return dataclasses.replace(members, vectors=self.read(members), paths=(),
                                   path_index=None, rows=None)

    # -- the k-means sample ---------------------------------------------------------------
    def write_sample(self, chunk: Chunk, ids: Sequence[str], vectors: np.ndarray) -> str:
        """A chunk's training rows as one small file; returns its path (what travels)."""
        self._check_shared()
        path = FileSystems.join(self._config.staging_dir, f"sample-{chunk.name}.npz")
        buffer = io.BytesIO()
        np.savez(buffer, ids=np.asarray(ids, dtype=str),
                 vectors=np.ascontiguousarray(vectors, dtype=np.float32))
        data = buffer.getvalue()
        write_atomically(path, lambda stream: stream.write(data))
        return path

    def read_sample(self, path: str) -> Tuple[List[str], np.ndarray]:
        self._check_shared()
        with FileSystems.open(path) as handle:
            with np.load(io.BytesIO(handle.read())) as npz:
                return npz["ids"].tolist(), npz["vectors"]

    # -- the end ----------------------------------------------------------------------------
    def discard_all(self) -> None:
        """Delete every scratch file (run once every dedup output is written)."""
        discard(self._config.staging_dir)


class ShuffledVectors(VectorStore):
    """Vectors decoded where needed; they cross the pairwise GroupByKey inline."""

    def routed(self, assigned: Assigned) -> Members:
        # Read once more here rather than carried from the assign step: Assigned elements
        # wait for the cluster-size side input, and must not hold the vectors while they do.
        members = assigned.members
        _, vectors = self.load(assigned.chunk)
        if members.rows.size < len(vectors):   # exact copies out (rows ascend), else as is
            vectors = vectors[members.rows]
        return dataclasses.replace(members, vectors=vectors, paths=(), path_index=None,
                                   rows=None)


class StagedVectors(VectorStore):
    """Vectors in raw float32 files under dedup/_staging/; references cross the shuffle."""

    def _first_copy(self, chunk: Chunk) -> str:
        return FileSystems.join(self._config.staging_dir, f"chunk-{chunk.name}.f32")

    def _by_cluster(self, chunk: Chunk) -> str:
        return FileSystems.join(self._config.staging_dir, f"chunk-{chunk.name}.by-cluster.f32")

    def checked(self, chunk: Chunk, decoded: Decoded, submit: Submit) -> None:
        self._check_shared()   # here, at the first step: a worker that cannot see fails now
        if len(chunk.dropped) < len(decoded.ids):   # nothing to stage: later loads decode
            submit(write_staged, self._first_copy(chunk), decoded.without(chunk.dropped)[1])

    def load(self, chunk: Chunk) -> Tuple[List[str], np.ndarray]:
        self._check_shared()
        staged = self._first_copy(chunk)
        if FileSystems.exists(staged):
            ids = [i for i, _ in chunk.ids(self._config, with_hash=False)]
            vectors = read_staged_rows(staged, chunk.dim, None)
            if len(vectors) != len(ids):
                raise OSError(f"{staged} holds {len(vectors)} rows where chunk {chunk.name} "
                              f"has {len(ids)} valid ones (a staged file was truncated or "
                              "replaced)")
            return ids, vectors
        return super().load(chunk)

    def placed(self, chunk: Chunk, vectors: np.ndarray, clusters: np.ndarray,
               kept: np.ndarray, submit: Submit) -> dict:
        """Stages the candidates sorted by cluster and drops the first copy: the pairwise
        step then reads the members of one (chunk, bin) as one run of rows, not one read per
        scattered row."""
        self._check_shared()
        order = np.argsort(clusters, kind="stable")
        path = self._by_cluster(chunk)
        submit(_restage, path, vectors, order, self._first_copy(chunk))
        rows = np.empty(order.size, dtype=np.int64)
        rows[order] = np.arange(order.size)
        return dict(paths=(path,), path_index=np.zeros(order.size, dtype=np.int32), rows=rows)


def vector_store(config: DedupConfig) -> VectorStore:
    return StagedVectors(config) if config.vector_transport == STAGED else ShuffledVectors(config)


# ---- the staged files: raw float32, rows of one dimension -------------------------------------

def _restage(path: str, vectors: np.ndarray, order: np.ndarray, first_copy: str) -> None:
    write_staged(path, vectors, order)
    discard(first_copy)   # nothing reads it again; a retry decodes the chunk


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

