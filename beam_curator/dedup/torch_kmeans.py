"""Spherical k-means in torch: the k-means of `train_kmeans` where faiss-gpu is not installed.

The same algorithm as faiss's spherical k-means (`n_iter` rounds of: assign every row to the
centroid of highest cosine, move each centroid to the normalised sum of its rows), with two
choices of its own, both deterministic and defined here rather than by a library's random
stream:

* initial centroids: the k rows with the smallest splitmix64 key of (seed, row), in key order;
* a centroid left with no rows restarts at the row worst served by its centroid (lowest best
  cosine, ties to the lowest row), the next empty one at the next such row.

Assignments use `shortlist.exact_top_m` (fast float32 shortlist, float64 re-score) and the sums
are accumulated in float64, so the CPU and a GPU give the same centroids up to the order of
float64 additions (a GPU's `index_add_` adds in any order): after the final rounding to
float32 they agree bit for bit except, rarely, in a last bit. The centroids differ from
faiss's (another initialisation); like faiss's they are written to centroids.npy, and
`--centroids` reuses them.
"""
from __future__ import annotations

import numpy as np

from beam_curator.dedup.shortlist import exact_top_m

_BLOCK_FLOATS = 1 << 25      # rows x k similarities per step (128 MiB fp32 + 256 MiB fp64)
_GOLDEN = 0x9E3779B97F4A7C15


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's output function on uint64 arrays (wrapping arithmetic, as specified)."""
    z = x + np.uint64(_GOLDEN)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def initial_rows(n: int, k: int, seed: int) -> np.ndarray:
    """The k training rows that start as centroids: smallest splitmix64(splitmix64(seed) ^ row)."""
    with np.errstate(over="ignore"):
        salt = _splitmix64(np.array([seed], dtype=np.uint64))[0]
        keys = _splitmix64(np.arange(n, dtype=np.uint64) ^ salt)
    return np.argsort(keys, kind="stable")[:k].astype(np.int64)


def train_spherical_kmeans(x: np.ndarray, k: int, n_iter: int, seed: int, device: str
                           ) -> np.ndarray:
    """(n, d) float32 rows (checked by the caller) -> (k, d) float32 unit centroids."""
    import torch

    n, d = x.shape
    rows = torch.from_numpy(x).to(device)
    start = torch.from_numpy(initial_rows(n, k, seed)).to(device)
    centroids = _normalised(rows[start].double(), fallback=None)
    rows_per_step = max(1, min(n, _BLOCK_FLOATS // k))
    for _ in range(n_iter):
        cn32 = centroids.float()
        sums = torch.zeros((k, d), dtype=torch.float64, device=device)
        labels = torch.empty(n, dtype=torch.int64, device=device)
        best = torch.empty(n, dtype=torch.float64, device=device)
        for s in range(0, n, rows_per_step):
            block = rows[s:s + rows_per_step]
            index, score = exact_top_m(block, cn32, centroids, 1, torch.float64)
            labels[s:s + block.shape[0]] = index[:, 0]
            best[s:s + block.shape[0]] = score[:, 0]
            sums.index_add_(0, index[:, 0], block.double())
        empty = (torch.bincount(labels, minlength=k) == 0).nonzero()[:, 0]
        if empty.numel():
            worst = torch.sort(best, stable=True).indices[:empty.numel()]
            sums[empty] = rows[worst].double()
        centroids = _normalised(sums, fallback=centroids)
    return np.ascontiguousarray(centroids.float().cpu().numpy())


def _normalised(sums, fallback):
    """Rows scaled to unit length; a zero row keeps its previous centroid (or stays zero)."""
    import torch

    norms = sums.norm(dim=1, keepdim=True)
    unit = sums / norms.clamp_min(torch.finfo(torch.float64).tiny)
    if fallback is None:
        return unit
    return torch.where(norms > 0, unit, fallback)
