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


def union_with_reference(ids: List[str], vectors: np.ndarray, reference_ids: List[str],
                         reference: np.ndarray, centroids: np.ndarray, eps: float,
                         which_to_keep: str = "hard", exact: bool = False
                         ) -> Dict[str, Tuple[str, str, float]]:
    """What a dedup of candidates and reference together removes from the candidates, with
    every reference row ranked before every candidate (so never removed), brute force:
    candidate id -> ("reference_duplicate", reference id, cosine) when some reference row of
    its cluster (any reference row, `exact`) is >= 1 - eps; else ("semantic_duplicate",
    earlier candidate, cosine) as `reference_semdedup` says. Kept candidates are absent."""
    c = centroids.astype(np.float64)
    c = c / np.linalg.norm(c, axis=1, keepdims=True)
    ref = reference.astype(np.float64)
    ref_labels = np.argmax(ref @ c.T, axis=1)
    cand = vectors.astype(np.float64)
    labels = np.argmax(cand @ c.T, axis=1)
    semantic = reference_semdedup(ids, vectors, centroids, eps, which_to_keep)
    out = {}
    for r, id_ in enumerate(ids):
        rows = np.arange(len(reference_ids)) if exact else np.flatnonzero(ref_labels == labels[r])
        if rows.size:
            scores = (ref[rows] @ cand[r]).astype(np.float32)
            best = scores.max()
            if best >= np.float32(1.0 - eps):
                winner = min(reference_ids[q] for q, s in zip(rows, scores) if s == best)
                out[id_] = ("reference_duplicate", winner, float(best))
                continue
        _, max_id, score, dup = semantic[id_]
        if dup:
            out[id_] = ("semantic_duplicate", max_id, score)
    return out
