"""Nearest-centroid assignment by cosine similarity, in bounded-memory blocks.

The embeddings are L2-normalised; each is assigned to the centroid `c` maximising
cos(v, c / ||c||). Outputs follow NeMo Curator's kmeans columns:
`cosine_dist_to_cent = 1 - v . (c / ||c||)` and `l2_dist_to_cent = ||v - c||` with `c` as stored.

The answer must not depend on how rows are chunked (Beam bundles, the plain script, the
three-step flow all chunk differently), but a float32 matmul may round a dot product
differently depending on the block's shape. So the matmul only shortlists: every centroid
within a rounding-error bound of the best is re-scored row by row in float64, a computation
that depends on nothing but the row and the centroid, and the best re-scored centroid wins
(ties: lowest centroid index). The reported distances come from the same row-wise values.

On a GPU (`device`, `backend`: see `dedup.backend`) the same rule runs in torch
(`shortlist.exact_top_m`): the shortlist comes from a float32 (or TF32) matmul with a bound
that covers it, the re-score is the same float64 row-by-row dot product, so the labels and
distances equal the numpy path's (up to float64 summation order, see `dedup.shortlist`).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from beam_curator.dedup._checks import as_float32_matrix, check_dims_match
from beam_curator.dedup.backend import TORCH, resolve
from beam_curator.dedup.kmeans import validate_centroids

# The (rows x k) similarity block is kept under this many floats (64 MiB of float32).
_BLOCK_FLOATS = 1 << 24
_MAX_BLOCK_ROWS = 8192
_U32 = 2.0 ** -24  # float32 unit roundoff


def _default_block_rows(k: int) -> int:
    return max(1, min(_MAX_BLOCK_ROWS, _BLOCK_FLOATS // k))


_PAIR_CHUNK = 2048   # rows per float64 scratch block (12 MiB at d = 768)


def _rowwise_dot(a64: np.ndarray, b64: np.ndarray) -> np.ndarray:
    """Per-row dot products in float64; each row's sum depends only on that row's data."""
    return np.sum(a64 * b64, axis=1)


def _pair_dots(v: np.ndarray, rows: np.ndarray, c64: np.ndarray, cols: np.ndarray
               ) -> np.ndarray:
    """float64 v[rows[p]] . c64[cols[p]] for every pair p, in small scratch blocks."""
    out = np.empty(rows.shape[0], dtype=np.float64)
    for s in range(0, rows.shape[0], _PAIR_CHUNK):
        e = s + _PAIR_CHUNK
        out[s:e] = _rowwise_dot(v[rows[s:e]].astype(np.float64), c64[cols[s:e]])
    return out


def _l2_dists(v: np.ndarray, c64: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """float32 ||v[r] - c64[labels[r]]|| per row, in small scratch blocks."""
    out = np.empty(v.shape[0], dtype=np.float32)
    for s in range(0, v.shape[0], _PAIR_CHUNK):
        e = s + _PAIR_CHUNK
        diff = v[s:e].astype(np.float64)
        diff -= c64[labels[s:e]]
        out[s:e] = np.sqrt(_rowwise_dot(diff, diff))
    return out


def _top_m(vectors: np.ndarray, centroids: np.ndarray, m: int,
           block_size: Optional[int]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The m most cosine-similar centroids of every row.

    Returns labels (n, m) int64, cosine similarities (n, m) float64 (-inf / label -1 where
    k < m), and the centroids as given (float64), for the l2 distance.
    """
    n, d = vectors.shape
    k = centroids.shape[0]
    c64 = centroids.astype(np.float64)
    cn64 = c64 / np.linalg.norm(c64, axis=1, keepdims=True)
    cn32T = np.ascontiguousarray(cn64.astype(np.float32).T)
    m_eff = min(m, k)
    rows_per_block = block_size or _default_block_rows(k)

    labels = np.full((n, m), -1, dtype=np.int64)
    sims = np.full((n, m), -np.inf, dtype=np.float64)
    for start in range(0, n, rows_per_block):
        vb = vectors[start:start + rows_per_block]
        b = vb.shape[0]
        s = vb @ cn32T                                            # (b, k) float32 shortlist
        if m_eff == 1:
            kth = s.max(axis=1)
        else:
            kth = np.partition(s, k - m_eff, axis=1)[:, k - m_eff]
        # Bound on the float32 matmul's rounding error (|c_hat| = 1), twice over: both the
        # candidate's and the m-th best's scores may be off. Scaled by |v| so unnormalised
        # input stays correct too.
        tol = 4.0 * d * _U32 * np.linalg.norm(vb, axis=1) + 1e-7
        rows, cols = np.nonzero(s >= (kth - tol)[:, None])        # >= m_eff per row
        exact = _pair_dots(vb, rows, cn64, cols)
        order = np.lexsort((cols, -exact, rows))                  # row, then best, then index
        rows, cols, exact = rows[order], cols[order], exact[order]
        first = np.searchsorted(rows, np.arange(b))
        take = first[:, None] + np.arange(m_eff)[None, :]
        labels[start:start + b, :m_eff] = cols[take]
        sims[start:start + b, :m_eff] = exact[take]
    return labels, sims, c64


# The torch path's (rows x k) step: larger than numpy's, a GPU wants big matrix products.
_TORCH_BLOCK_FLOATS = 1 << 25


def _top_m_torch(v: np.ndarray, centroids: np.ndarray, m: int, block_size: Optional[int],
                 device: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_top_m` + `_l2_dists` of the nearest, in torch on `device`: the same shortlist rule
    (with a bound that covers TF32) and the same float64 row-wise re-score."""
    import torch

    from beam_curator.dedup.shortlist import exact_top_m

    n, k = v.shape[0], centroids.shape[0]
    c64 = centroids.astype(np.float64)
    cn64 = c64 / np.linalg.norm(c64, axis=1, keepdims=True)   # the numpy path's own values
    c64_t = torch.from_numpy(c64).to(device)
    cn64_t = torch.from_numpy(cn64).to(device)
    cn32_t = cn64_t.float()
    rows_per_block = block_size or max(1, _TORCH_BLOCK_FLOATS // k)
    labels = np.empty((n, m), dtype=np.int64)
    sims = np.empty((n, m), dtype=np.float64)
    l2 = np.empty(n, dtype=np.float32)
    for start in range(0, n, rows_per_block):
        stop = min(n, start + rows_per_block)
        vb = torch.from_numpy(v[start:stop]).to(device)
        index, score = exact_top_m(vb, cn32_t, cn64_t, m, torch.float64)
        diff = vb.double() - c64_t[index[:, 0]]
        labels[start:stop] = index.cpu().numpy()
        sims[start:stop] = score.cpu().numpy()
        l2[start:stop] = (diff * diff).sum(dim=1).sqrt().float().cpu().numpy()
    return labels, sims, l2


def _assign(vectors, centroids, m: int, block_size: Optional[int], device: Optional[str],
            backend: Optional[str]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels (n, m) int64, cosine similarities (n, m) float64 and the l2 distance of the
    nearest (n,) float32, on the chosen backend."""
    v = as_float32_matrix(vectors, "embeddings")
    c = validate_centroids(centroids)
    check_dims_match(c, v)
    choice = resolve(device, backend)
    if choice.name == TORCH:
        return _top_m_torch(v, c, m, block_size, choice.device)
    labels, sims, c64 = _top_m(v, c, m, block_size)
    return labels, sims, _l2_dists(v, c64, labels[:, 0])


def assign_to_centroids(vectors: np.ndarray, centroids: np.ndarray,
                        block_size: Optional[int] = None, device: Optional[str] = None,
                        backend: Optional[str] = None
                        ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest centroid of each L2-normalised embedding.

    Returns `(labels int32 (n,), cosine_dist float32 (n,), l2_dist float32 (n,))`. Memory is
    bounded by `block_size` rows x k floats at a time (default: 64 MiB of similarities on the
    CPU, 128 MiB with torch). The result is identical whatever the chunking of the rows, and
    on every backend (`device`, `backend`: see `dedup.backend`).
    """
    labels, sims, l2 = _assign(vectors, centroids, 1, block_size, device, backend)
    cos_dist = (1.0 - sims[:, 0]).astype(np.float32)
    return labels[:, 0].astype(np.int32), cos_dist, l2


def assign_top2(vectors: np.ndarray, centroids: np.ndarray, block_size: Optional[int] = None,
                device: Optional[str] = None, backend: Optional[str] = None
                ) -> Tuple[np.ndarray, np.ndarray]:
    """The two nearest centroids of each embedding, nearest first.

    Returns `(labels (n, 2) int32, cosine_dist (n, 2) float32)`; with a single centroid the
    second column is label -1 and distance +inf. Ties as in `assign_to_centroids`, whose
    labels and distances equal column 0 here.
    """
    return assign_with_runner_up(vectors, centroids, block_size, device, backend)[3:]


def assign_with_runner_up(vectors: np.ndarray, centroids: np.ndarray,
                          block_size: Optional[int] = None, device: Optional[str] = None,
                          backend: Optional[str] = None) -> Tuple[np.ndarray, ...]:
    """`assign_to_centroids` + `assign_top2` from one similarity pass (for --border_margin):
    `(labels, cosine_dist, l2_dist, labels (n, 2), cosine_dist (n, 2))`."""
    labels, sims, l2 = _assign(vectors, centroids, 2, block_size, device, backend)
    with np.errstate(invalid="ignore"):
        dist = (1.0 - sims).astype(np.float32)   # 1 - (-inf) = +inf for the missing second
    return (labels[:, 0].astype(np.int32), dist[:, 0].copy(), l2, labels.astype(np.int32),
            dist)


def border_assignments(labels2: np.ndarray, dists2: np.ndarray, margin: float
                       ) -> List[Tuple[int, int]]:
    """Extra cluster memberships for border points.

    A row whose second-nearest centroid is within `margin` cosine distance of its nearest
    (`dist2 - dist1 <= margin`, inclusive) is also placed in that second cluster, so a
    near-duplicate pair split by a cluster boundary is still compared. Returns
    `[(row, second_cluster), ...]` in row order.
    """
    labels2 = np.asarray(labels2)
    dists2 = np.asarray(dists2)
    if labels2.ndim != 2 or labels2.shape[1] != 2 or dists2.shape != labels2.shape:
        raise ValueError(f"expected (n, 2) labels and distances, got {labels2.shape} "
                         f"and {dists2.shape}")
    margin = float(margin)
    if not margin >= 0.0:
        raise ValueError(f"border margin must be >= 0, got {margin}")
    gap = dists2[:, 1].astype(np.float64) - dists2[:, 0].astype(np.float64)
    rows = np.nonzero((labels2[:, 1] >= 0) & np.isfinite(gap) & (gap <= margin))[0]
    return [(int(r), int(labels2[r, 1])) for r in rows]
