"""A brute-force SemDeDup reference for the tests: full matrices, float64, plain loops."""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np


def reference_semdedup(ids: List[str], vectors: np.ndarray, centroids: np.ndarray, eps: float,
                       which_to_keep: str = "hard") -> Dict[str, Tuple[int, str, float, bool]]:
    """id -> (cluster, max_id, max cosine to an earlier-ranked member, is duplicate)."""
    v = vectors.astype(np.float64)
    c = centroids.astype(np.float64)
    c = c / np.linalg.norm(c, axis=1, keepdims=True)
    sims = v @ c.T
    labels = np.argmax(sims, axis=1)   # argmax takes the lowest index on ties, as we do
    cos_dist = 1.0 - sims[np.arange(len(ids)), labels]
    out = {}
    for cluster in np.unique(labels):
        rows = [r for r in range(len(ids)) if labels[r] == cluster]
        if which_to_keep == "hard":
            rows.sort(key=lambda r: (-np.float32(cos_dist[r]), ids[r]))
        elif which_to_keep == "easy":
            rows.sort(key=lambda r: (np.float32(cos_dist[r]), ids[r]))
        else:
            raise ValueError("the reference knows hard and easy")
        for position, r in enumerate(rows):
            if position == 0:
                out[ids[r]] = (int(cluster), ids[r], 0.0, False)
                continue
            earlier = rows[:position]
            scores = [float(v[r] @ v[q]) for q in earlier]
            best = int(np.argmax(scores))
            out[ids[r]] = (int(cluster), ids[earlier[best]], scores[best],
                           scores[best] >= 1.0 - eps)
    return out


def planted_embeddings(n_groups: int, per_group: int, dim: int, seed: int = 0):
    """Tight groups around random directions, plus planted near and exact duplicates.

    Returns (ids, vectors float32 normalised, planted) where planted maps a planted id to the
    id it copies and the intended cosine.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_groups, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    ids, rows, planted = [], [], {}
    for g in range(n_groups):
        for i in range(per_group):
            x = centres[g] + 0.35 * rng.normal(size=dim) / np.sqrt(dim)
            rows.append(x / np.linalg.norm(x))
            ids.append(f"g{g:02d}/{i:04d}")
    base = np.array(rows)
    for j, target_cos in enumerate([0.9999, 0.999, 0.995, 0.98, 0.9, 1.0]):
        src = (j * 7) % len(ids)
        noise = rng.normal(size=dim)
        noise -= (noise @ base[src]) * base[src]
        noise /= np.linalg.norm(noise)
        angle = np.arccos(min(1.0, target_cos))
        copy = np.cos(angle) * base[src] + np.sin(angle) * noise
        ids.append(f"p{j:02d}/copy")
        rows.append(copy / np.linalg.norm(copy))
        planted[f"p{j:02d}/copy"] = (ids[src], target_cos)
    return ids, np.array(rows, dtype=np.float32), planted
