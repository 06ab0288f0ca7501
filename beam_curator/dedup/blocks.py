"""Scale-out of the pairwise step: clusters cut into hash blocks whose pairs run anywhere.

A cluster of n members with n <= block_rows is one piece of work, exactly as in
`pairwise.max_sim_to_earlier`; such clusters are packed, in cluster order, into bins of at
most min(BIN_ROWS, block_rows) members (`pack_clusters`), one key each, so that fewer and
larger elements cross the shuffle when clusters are small. A larger cluster is cut into
nb = ceil(n / block_rows) blocks by a hash of each member's id (no global sort, so no step
needs the whole cluster). Every unordered pair of blocks {a, b} is its own piece of work,
holding at most ~2 x block_rows members; for each member it finds the best earlier-ranked
member of the other block (`cross_partials`), and the diagonal {a, a} the best earlier one
inside the block. A member's answer is the best of its nb partials (`merge_partials`): the
highest similarity, ties to the earliest-ranked member -- exactly what one pass over the
whole ranked cluster gives, because the rank order (`ranking.rank_primary`, then the id) is global
and every similarity is the same float64-accumulated dot product rounded once to float32
(`pairwise.block_similarities`).

Plan defaults (`auto_n_clusters`, `auto_sample_size`) follow SemDeDup and NeMo Curator at
scale: about 10,000 rows per cluster, and faiss's rule of thumb of tens to hundreds of
training points per centroid.
"""
from __future__ import annotations

import hashlib
import math
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from beam_curator.dedup.backend import NUMPY, resolve
from beam_curator.dedup.pairwise import (
    STRIP_ROWS,
    TILE_ROWS,
    block_similarities,
    max_sim_to_earlier,
)

ROWS_PER_CLUSTER = 10_000       # SemDeDup: 50k clusters on LAION-440M; NeMo: ~10k rows each
POINTS_PER_CENTROID = 64        # faiss trains well on 39-256 points per centroid
DEFAULT_BLOCK_ROWS = 16_384     # members per block: ~50 MB of 768-d vectors per side
# Small clusters share a key up to this many members: enough to cut the elements of
# 1,000-row clusters 4x, small enough that a bin is no larger than the clusters at the
# default ~10,000 rows. Bins filled to 16,384 rows made Flink's pairwise SDK workers the
# largest (1.5 GB at 1M rows, BENCHMARKS.md).
BIN_ROWS = 4_096


# ---- the plan: how many clusters, how large a training sample, how many blocks -------------

def auto_n_clusters(n_candidates: int, rows_per_cluster: int = ROWS_PER_CLUSTER) -> int:
    """About one cluster per `rows_per_cluster` candidates, at least one."""
    return max(1, int(round(n_candidates / rows_per_cluster)))


def auto_sample_size(n_clusters: int, points_per_centroid: int = POINTS_PER_CENTROID) -> int:
    """The k-means training sample: sized by k, never by the number of candidates."""
    return max(1, n_clusters) * points_per_centroid


def n_blocks(cluster_size: int, block_rows: int) -> int:
    return max(1, math.ceil(cluster_size / block_rows))


def pack_clusters(sizes: Mapping[int, int], block_rows: int,
                  bin_rows: int = BIN_ROWS) -> Dict[int, int]:
    """cluster -> its bin (the bin's first cluster) for every cluster of at most block_rows
    members: consecutive clusters share a bin while their members add up to at most
    min(bin_rows, block_rows); a cluster larger than that has a bin of its own.

    One bin is one key of the pairwise GroupByKey. A chunk sends one element per bin instead
    of one per cluster (1,000-row clusters in 4,096-row bins: ~4x fewer elements to encode),
    and a key still holds at most block_rows members. Larger clusters are not in the result:
    they are cut into blocks. Depends on the sizes alone, so every worker packs alike.
    """
    capacity = min(bin_rows, block_rows)
    bins, first, filled = {}, None, 0
    for cluster in sorted(sizes):
        size = sizes[cluster]
        if size > block_rows:
            continue
        if first is None or filled + size > capacity:
            first, filled = cluster, 0
        bins[cluster] = first
        filled += size
    return bins


def positions_by_cluster(clusters: np.ndarray):
    """(cluster, its positions in ascending order) for each cluster present, in cluster
    order: one sort, not one pass over the array per cluster."""
    order = np.argsort(clusters, kind="stable")
    ordered = clusters[order]
    starts = np.flatnonzero(np.diff(ordered)) + 1
    for start, stop in zip([0, *starts.tolist()], [*starts.tolist(), ordered.size]):
        if stop > start:
            yield int(ordered[start]), order[start:stop]


def block_of(ids: Sequence[str], nb: int, cluster: int) -> np.ndarray:
    """Each member's block in [0, nb): blake2b of (cluster, id), the same on every worker."""
    if nb <= 1:
        return np.zeros(len(ids), dtype=np.int64)
    prefix = f"block:{cluster}:"
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b((prefix + i).encode("utf-8"), digest_size=8).digest(),
                        "big") % nb for i in ids), dtype=np.int64, count=len(ids))


def pair_keys(block: int, nb: int) -> list:
    """The unordered block pairs (lo, hi) a member of `block` takes part in: nb of them."""
    return [(min(block, j), max(block, j)) for j in range(nb)]


# ---- partials: (similarity, the source's rank key, the source's id) per member ---------------

def _earlier(p_a, id_a, p_b, id_b) -> np.ndarray:
    """Elementwise (p_a, id_a) < (p_b, id_b): the rank order."""
    return (p_a < p_b) | ((p_a == p_b) & (id_a < id_b))


def diagonal_partial(vectors_ranked: np.ndarray, ids_ranked: Sequence[str],
                     primary_ranked: np.ndarray, device: Optional[str] = None,
                     backend: Optional[str] = None
                     ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inside one rank-sorted block: each member's best earlier member of the same block.

    Returns `(sim float32, source primary, source id object array)`; a member with no earlier
    member gets -inf and its own key (never preferred: -inf loses to any real similarity).
    `device`, `backend`: where the similarities are computed (`dedup.backend`; same answer).
    """
    sim, arg = max_sim_to_earlier(vectors_ranked, TILE_ROWS, device=device, backend=backend)
    ids = np.asarray(list(ids_ranked), dtype=object)
    none = arg < 0
    src = np.where(none, 0, arg)
    sim = np.where(none, np.float32(-np.inf), sim).astype(np.float32)
    return sim, np.asarray(primary_ranked)[src], ids[src]


def cross_partial(target_vectors: np.ndarray, target_primary: np.ndarray, target_ids,
                  source_vectors: np.ndarray, source_primary: np.ndarray, source_ids,
                  device: Optional[str] = None, backend: Optional[str] = None
                  ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each target: its best source ranked before it (sources rank-sorted).

    Both sides come from different blocks of one cluster. Returns (sim, source primary,
    source id) like `diagonal_partial`; -inf when no source ranks before the target.
    """
    n_t, n_s = target_vectors.shape[0], source_vectors.shape[0]
    best = np.full(n_t, -np.inf, np.float32)
    arg = np.full(n_t, -1, np.int64)
    s_ids = np.asarray(list(source_ids), dtype=object)
    if n_t and n_s:
        # Sources are rank-sorted, so those before target t are a prefix of length count[t]:
        # the number of sources ahead of t in the rank order of sources and targets together.
        primary = np.concatenate([np.asarray(source_primary), np.asarray(target_primary)])
        ids = np.asarray(list(source_ids) + list(target_ids), dtype=str)
        order = np.lexsort((ids, primary))
        sources_so_far = np.cumsum(order < n_s)
        count = np.empty(n_t, dtype=np.int64)
        is_target = order >= n_s
        count[order[is_target] - n_s] = sources_so_far[is_target]
        choice = resolve(device, backend)
        # numpy: bounded scratch (pairwise.STRIP_ROWS); a GPU keeps its large tiles
        step = STRIP_ROWS if choice.name == NUMPY else TILE_ROWS
        for t0 in range(0, n_t, step):
            t1 = min(n_t, t0 + step)
            reach = int(count[t0:t1].max())
            if choice.name != NUMPY:
                best[t0:t1], arg[t0:t1] = _cross_tile_torch(
                    target_vectors[t0:t1], source_vectors[:reach], count[t0:t1], choice.device)
                continue
            for s0 in range(0, reach, TILE_ROWS):
                s1 = min(reach, s0 + TILE_ROWS)
                sims = block_similarities(target_vectors[t0:t1], source_vectors[s0:s1])
                sims[np.arange(s0, s1)[None, :] >= count[t0:t1, None]] = -np.inf
                a = np.argmax(sims, axis=1)                # first max = earliest-ranked
                m = sims[np.arange(t1 - t0), a]
                better = m > best[t0:t1]                   # equal: keep the earlier tile
                best[t0:t1][better] = m[better]
                arg[t0:t1][better] = (a + s0)[better]
    if not n_s:
        return best, np.zeros(n_t, dtype=np.asarray(source_primary).dtype), \
            np.full(n_t, "", dtype=object)
    src = np.where(arg < 0, 0, arg)
    return best, np.asarray(source_primary)[src], s_ids[src]


def _cross_tile_torch(targets: np.ndarray, sources: np.ndarray, count: np.ndarray, device
                      ) -> Tuple[np.ndarray, np.ndarray]:
    """One target tile against its reachable sources on a torch device: a fast shortlist
    re-scored in float64 (`dedup.shortlist`), so the same answer as the numpy tiles."""
    import torch

    from beam_curator.dedup.shortlist import exact_top_m

    if not sources.shape[0]:
        return np.full(len(targets), -np.inf, np.float32), np.full(len(targets), -1, np.int64)
    a = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32)).to(device)
    b = torch.from_numpy(np.ascontiguousarray(sources, dtype=np.float32)).to(device)
    index, score = exact_top_m(a, b, b.double(), 1, torch.float32,
                               limit=torch.from_numpy(count))
    return score[:, 0].cpu().numpy(), index[:, 0].cpu().numpy()


def merge_partials(a: Tuple[np.ndarray, np.ndarray, np.ndarray],
                   b: Tuple[np.ndarray, np.ndarray, np.ndarray]
                   ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The better of two partials per member: higher similarity, ties to the earlier source.
    Order-independent (associative and commutative), so any combining tree agrees."""
    sim_a, p_a, id_a = a
    sim_b, p_b, id_b = b
    take_b = (sim_b > sim_a) | ((sim_b == sim_a) & (sim_b > -np.inf)
                                & _earlier(p_b, id_b, p_a, id_a))
    return (np.where(take_b, sim_b, sim_a).astype(np.float32), np.where(take_b, p_b, p_a),
            np.where(take_b, id_b, id_a))
