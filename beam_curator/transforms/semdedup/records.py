"""The records and keys that cross dedup's shuffles, named.

Columnar, so a GroupByKey moves one element per chunk x bin (or block) instead of one pickled
object per sample: `Assigned` is a chunk's candidates with their clusters; `Members` the
columns of the members of one bin of small clusters, or of one block of a large cluster, from
one chunk; `Decisions` the pairwise step's answer for one cluster or block; `BlockPartial`
one block pair's contribution to a block's answer.

The pairwise GroupByKey has two kinds of key, each its own type: a `BinKey` (whole small
clusters, compared in one pass) and a `BlockPairKey` (two blocks of a cluster too large for
one key). A `BlockKey` names one block, where its partials are combined; `cluster_file` names
the output files of one cluster or block.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Sequence, Tuple

import numpy as np

from beam_curator.dedup.blocks import positions_by_cluster
from beam_curator.transforms.semdedup.sources import Chunk


class BinKey(NamedTuple):
    """Whole clusters of at most --pairwise_block_size members (`blocks.pack_clusters`),
    named by the bin's first cluster."""

    first_cluster: int


class BlockPairKey(NamedTuple):
    """Blocks lo <= hi of a cluster cut into n_blocks hash blocks (`blocks.block_of`)."""

    cluster: int
    n_blocks: int
    lo: int
    hi: int


class BlockKey(NamedTuple):
    """One block of a cut cluster: where its block pairs' partials are combined."""

    cluster: int
    n_blocks: int
    block: int


def wire_key(key: tuple) -> tuple:
    """A key as the shuffle carries it: a plain tuple of ints, which Beam encodes
    deterministically itself (a NamedTuple key would take its fallback coder, with a warning
    in every run's log). `pairwise_key` / `BlockKey(*wire)` name it again on the other side."""
    return tuple(int(v) for v in key)


def pairwise_key(wire: tuple):
    """The pairwise GroupByKey's key from the wire: a BinKey (one int) or a BlockPairKey."""
    return BinKey(*wire) if len(wire) == 1 else BlockPairKey(*wire)


def cluster_file(cluster: int, n_blocks: int = 1, block: int = 0) -> str:
    """The name (no extension) of a cluster's, or a block's, kmeans/ pairwise_results/ and
    duplicates/ files."""
    return (f"cluster-{cluster:06d}" if n_blocks == 1
            else f"cluster-{cluster:06d}-block-{block:04d}")


class Part(NamedTuple):
    """What Route sends to a pairwise key: some members of one chunk, all of them in
    `block` (0 for a bin), and whether they are --reference rows (compared with, never
    answered for)."""

    block: int
    members: "Members"
    reference: bool = False


class ReferenceMatches(NamedTuple):
    """Per member (aligned with its Decisions' members): the most similar --reference row
    it met, and that similarity (-inf and "" where it met none)."""

    sim: np.ndarray                       # float32
    ids: np.ndarray                       # object array of str

    def take(self, index) -> "ReferenceMatches":
        return ReferenceMatches(self.sim[index], self.ids[index])


class ExactDuplicate(NamedTuple):
    """A copy found by the exact pre-pass (same content hash as a smaller id)."""

    id: str
    survivor: str
    chunk: str            # the chunk the copy was read from: where its outputs are written


@dataclasses.dataclass(frozen=True)
class Members:
    """Columns of some members of one cluster or bin: one Beam element per (chunk, bin) or
    (chunk, block), so the shuffle moves a few arrays instead of one pickled object per
    sample.

    Vectors come inline (`vectors`) or as references (`rows[i]` of the staged file
    `paths[path_index[i]]`): which one is the vector store's business (`semdedup.vectors`),
    and only it reads them. `cluster` is set where one element carries several whole
    clusters (a bin of small clusters: `blocks.pack_clusters`).
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
    is_duplicate: np.ndarray              # bool: a semantic duplicate (of a candidate)
    reference: Optional[ReferenceMatches] = None   # with --reference
    is_reference_duplicate: Optional[np.ndarray] = None   # bool, with --reference

    def __len__(self) -> int:
        return len(self.members)

    def rows(self):
        """(id, max_id, cosine_sim, is_duplicate) per member."""
        return zip(self.members.ids, self.max_ids, self.cosine_sim.tolist(),
                   self.is_duplicate.tolist())


def without_vectors(members: Members) -> Members:
    return dataclasses.replace(members, vectors=None, paths=(), path_index=None, rows=None,
                               cluster=None)


class Placement(NamedTuple):
    """Some of a chunk's members placed in clusters: `clusters[i]` holds member
    `members[i]`; `border`: these are second memberships (--border_margin)."""

    clusters: np.ndarray                  # int64
    members: np.ndarray                   # int64 indices into Assigned.members
    border: bool


@dataclasses.dataclass(frozen=True)
class Assigned:
    """A chunk's candidate rows and their cluster memberships (no vectors: they are read
    again where they are routed, so they never wait behind the cluster-size side input).

    `members` holds every candidate row (`rows`: its row in the chunk's candidates, which is
    also its row in the staged file); `placements`: the home clusters, and with
    --border_margin the second ones.
    """

    chunk: Chunk
    members: Members
    placements: Tuple[Placement, ...]

    def cluster_counts(self):
        for placement in self.placements:
            values, counts = np.unique(placement.clusters, return_counts=True)
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
    reference: Optional[ReferenceMatches] = None   # the best --reference row seen there

    def merged(self, other: "BlockPartial") -> "BlockPartial":
        from beam_curator.dedup.blocks import merge_partials
        from beam_curator.dedup.reference import merge_best

        sim, primary, source = merge_partials(
            (self.sim, self.source_primary, self.source_id),
            (other.sim, other.source_primary, other.source_id))
        reference = self.reference if other.reference is None else other.reference
        if self.reference is not None and other.reference is not None:
            reference = ReferenceMatches(*merge_best(self.reference, other.reference))
        return BlockPartial(self.members if self.members is not None else other.members,
                            sim, primary, source, reference)

