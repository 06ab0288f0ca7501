"""The order of members inside one cluster: the earlier-ranked member of a duplicate pair is kept.

`hard`   farthest from the centroid first (descending cosine distance): keeps the atypical
         examples, SemDeDup's default;
`easy`   nearest first: keeps the prototypical examples;
`random` a pseudo-random order keyed by (seed, cluster, id).

Ties are broken by id ascending, so the order never depends on the order the members arrived
in (it differs between runners and between runs of a distributed one).
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from beam_curator.dedup._checks import as_float_vector
from beam_curator.defaults import WHICH_TO_KEEP


def _id_array(ids: Sequence[str]) -> np.ndarray:
    # Unicode numpy arrays sort by code point, exactly like Python str comparison.
    return np.asarray(list(ids), dtype=str) if len(ids) else np.empty(0, dtype="U1")


def random_rank_keys(ids: Sequence[str], seed: int, cluster: int) -> np.ndarray:
    """A 64-bit key per member from blake2b("rank:{seed}:{cluster}:{id}").

    A hash rather than a numpy Generator permutation: numpy does not promise the same stream
    across versions, and Dataflow workers, the local runner and the plain script must agree.
    A member's key depends on its own id only, so the order of the others is stable when a
    member is added or removed.
    """
    prefix = f"rank:{seed}:{cluster}:"
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b((prefix + i).encode("utf-8"), digest_size=8).digest(),
                        "big") for i in ids),
        dtype=np.uint64, count=len(ids))


def rank_primary(ids: Sequence[str], cos_dist: np.ndarray, which_to_keep: str, seed: int,
                 cluster: int) -> np.ndarray:
    """The primary rank key of each member; the order is ascending (primary, id).

    float64 of the float32 distance for hard (negated) and easy, so the order is the one the
    written kmeans/ files (float32 `cosine_dist_to_cent`) give; uint64 for random."""
    if which_to_keep not in WHICH_TO_KEEP:
        raise ValueError(f"which_to_keep must be one of {', '.join(WHICH_TO_KEEP)}; "
                         f"got {which_to_keep!r}")
    if which_to_keep == "random":
        return random_rank_keys(list(ids), int(seed), int(cluster))
    dist = as_float_vector(cos_dist, "cos_dist", len(ids)).astype(np.float32).astype(np.float64)
    return -dist if which_to_keep == "hard" else dist


def rank_order(ids: Sequence[str], primary: np.ndarray) -> np.ndarray:
    """Indices that sort the members by (primary, id): ties broken by id."""
    return np.lexsort((_id_array(ids), primary)).astype(np.int64)


def rank_cluster(ids: Sequence[str], cos_dist: np.ndarray, which_to_keep: str, seed: int,
                 cluster: int) -> np.ndarray:
    """Rank the members of one cluster; returns the order as int64 indices into the input.

    `cos_dist` is each member's cosine distance to the cluster's centroid. Position 0 is kept
    first: a member is a duplicate when it is too similar to any member ranked before it.
    """
    if len(set(ids)) != len(ids):
        raise ValueError("ids inside one cluster must be unique")
    return rank_order(ids, rank_primary(ids, cos_dist, which_to_keep, seed, cluster))
