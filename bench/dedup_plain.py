"""The plain-script baseline for the dedup benchmark: the same work as the Beam graph's semantic
dedup, with no Beam -- faiss k-means on the hash-sampled rows, nearest-centroid assignment, and
the per-cluster pairwise step, all with `beam_curator.dedup`'s functions, on one in-memory array.

    python bench/dedup_plain.py --n 1000000 --d 768 --n-dups 10000 --n-clusters 1000
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

if __package__ in (None, ""):  # run as a script: make `bench` and `beam_curator` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from beam_curator.dedup import (  # noqa: E402
    TILE_ROWS,
    assign_to_centroids,
    is_duplicate,
    max_sim_to_earlier,
    rank_cluster,
    sample_fraction,
    sample_mask,
    train_kmeans,
)


@dataclass
class PlainResult:
    """Per input row (aligned with the embeddings) unless noted."""

    centroids: np.ndarray             # (k, d) float32
    labels: np.ndarray                # int32 cluster
    cosine_dist: np.ndarray           # float32, to the cluster's centroid
    l2_dist: np.ndarray               # float32
    max_row: np.ndarray               # int64 row of max_id (the row itself for a first member)
    cosine_sim_score: np.ndarray      # float32 (0.0 for a first member)
    is_duplicate: np.ndarray          # bool
    duplicates: List[str]             # removal ids, sorted
    n_train: int = 0
    timings: Dict[str, float] = field(default_factory=dict)


def plain_semdedup(embeddings: np.ndarray, ids: Sequence[str], n_clusters: int, n_iter: int,
                   eps: float, which_to_keep: str, seed: int, sample_size: Optional[int],
                   block_size: int = TILE_ROWS, centroids: Optional[np.ndarray] = None,
                   device: Optional[str] = None, backend: Optional[str] = None,
                   kmeans_backend: Optional[str] = None) -> PlainResult:
    """SemDeDup over L2-normalised `embeddings` (n, d) float32 with ids aligned to the rows.

    `centroids` skips training (n_clusters is then their number); `device` and `backend`
    choose where the math runs (`beam_curator.dedup.backend`), `kmeans_backend` faiss or
    torch for the training."""
    n = embeddings.shape[0]
    if len(ids) != n:
        raise ValueError(f"{len(ids)} ids for {n} embeddings")
    t = {}

    t0 = time.perf_counter()
    train_rows = np.zeros(0, dtype=np.int64)
    if centroids is None:
        mask = sample_mask(ids, sample_fraction(n, sample_size), seed)
        train_rows = np.nonzero(mask)[0]
        train_rows = train_rows[np.argsort(np.asarray([ids[r] for r in train_rows], dtype=str),
                                           kind="stable")]   # by id, like the Beam graph
        centroids = train_kmeans(embeddings[train_rows], n_clusters, n_iter=n_iter, seed=seed,
                                 device=device, backend=kmeans_backend)
    n_clusters = centroids.shape[0]
    t["kmeans_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    labels, cos_dist, l2_dist = assign_to_centroids(embeddings, centroids, device=device,
                                                    backend=backend)
    t["assign_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rank_s = 0.0            # ranking inside pairwise_s: the same CPU work on every backend
    max_row = np.arange(n, dtype=np.int64)
    score = np.zeros(n, dtype=np.float32)
    dup = np.zeros(n, dtype=bool)
    by_cluster = np.argsort(labels, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=n_clusters))])
    for c in range(n_clusters):
        rows = by_cluster[bounds[c]:bounds[c + 1]]
        if rows.size == 0:
            continue
        t_rank = time.perf_counter()
        ranked = rows[rank_cluster([ids[r] for r in rows], cos_dist[rows], which_to_keep,
                                   seed, c)]
        rank_s += time.perf_counter() - t_rank
        ms, am = max_sim_to_earlier(embeddings[ranked], block_size, device, backend)
        has = am >= 0
        max_row[ranked[has]] = ranked[am[has]]
        score[ranked] = ms
        dup[ranked] = is_duplicate(ms, eps) & has
    duplicates = sorted(ids[r] for r in np.nonzero(dup)[0])
    t["pairwise_s"] = time.perf_counter() - t0
    t["rank_s"] = rank_s
    t["total_s"] = t["kmeans_s"] + t["assign_s"] + t["pairwise_s"]
    return PlainResult(centroids, labels, cos_dist, l2_dist, max_row, score, dup, duplicates,
                       n_train=int(train_rows.size), timings=t)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # KiB on Linux


def main(argv=None) -> None:
    from bench.synthetic import DEFAULT_EPS, make_planted_embeddings

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--n-dups", type=int, default=1000)
    ap.add_argument("--n-clusters", type=int, default=100)
    ap.add_argument("--n-iter", type=int, default=20)
    ap.add_argument("--eps", type=float, default=DEFAULT_EPS)
    ap.add_argument("--which-to-keep", default="hard")
    ap.add_argument("--sample-size", type=int, default=100_000)
    ap.add_argument("--block-size", type=int, default=TILE_ROWS)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    t0 = time.perf_counter()
    ids, vectors, pairs = make_planted_embeddings(a.n, a.d, a.n_dups, a.seed)
    gen_s = time.perf_counter() - t0
    rss_after_gen = _peak_rss_bytes()
    res = plain_semdedup(vectors, ids, a.n_clusters, a.n_iter, a.eps, a.which_to_keep,
                         a.seed, a.sample_size, a.block_size)

    # Each planted pair should lose exactly one member; anything else removed is unexpected.
    planted_dup = res.is_duplicate[pairs]
    planted_rows = set(pairs.ravel().tolist())
    report = {
        "n": a.n, "d": a.d, "n_clusters": a.n_clusters, "n_train": res.n_train,
        "generate_s": round(gen_s, 2),
        **{k: round(v, 2) for k, v in res.timings.items()},
        "embedding_bytes": int(vectors.nbytes),
        "peak_rss_bytes": _peak_rss_bytes(),
        "peak_rss_after_generate_bytes": rss_after_gen,
        "peak_rss_over_embeddings": round(_peak_rss_bytes() / vectors.nbytes, 2),
        "removed": len(res.duplicates),
        "planted_pairs": int(len(pairs)),
        "planted_pairs_found": int(planted_dup.any(axis=1).sum()),
        "planted_pairs_both_removed": int(planted_dup.all(axis=1).sum()),
        "removed_outside_plants": int(sum(1 for r in np.nonzero(res.is_duplicate)[0]
                                          if int(r) not in planted_rows)),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
