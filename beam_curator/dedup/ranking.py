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


def _check_ids(ids: Sequence[str]) -> np.ndarray:
    if len(set(ids)) != len(ids):
        raise ValueError("ids inside one cluster must be unique")
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


def rank_cluster(ids: Sequence[str], cos_dist: np.ndarray, which_to_keep: str, seed: int,
                 cluster: int) -> np.ndarray:
    """Rank the members of one cluster; returns the order as int64 indices into the input.

    `cos_dist` is each member's cosine distance to the cluster's centroid. Position 0 is kept
    first: a member is a duplicate when it is too similar to any member ranked before it.
    """
    if which_to_keep not in WHICH_TO_KEEP:
        raise ValueError(f"which_to_keep must be one of {', '.join(WHICH_TO_KEEP)}; "
                         f"got {which_to_keep!r}")
    n = len(ids)
    id_arr = _check_ids(ids)
    if which_to_keep == "random":
        keys = random_rank_keys(id_arr.tolist(), int(seed), int(cluster))
        order = np.lexsort((id_arr, keys))
    else:
        dist = as_float_vector(cos_dist, "cos_dist", n).astype(np.float64)
        primary = -dist if which_to_keep == "hard" else dist
        # lexsort: the last key is the primary one; equal distances fall back to the id.
        order = np.lexsort((id_arr, primary))
    return order.astype(np.int64)
