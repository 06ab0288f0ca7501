"""How much of a --reference match the cluster-restricted search finds, against brute force.

`dedup --reference` compares a candidate only with the reference rows of its own cluster (and,
with --border_margin, of its second one), so a match that k-means put in another cluster is
missed; `--reference_exact` compares with every reference row. This bench writes N candidates
and N reference rows (CLIP-like synthetic embeddings, `bench/synthetic.py`) with `n_dups`
candidates planted as near-copies of reference rows, finds the true reference duplicates by
brute force (numpy, every pair), then runs `dedup --reference` three ways on the local runner
and prints, for each, the recall of the true set, whether it found anything false, and its
seconds; the plain within-cluster time is the ratio's base.

    python bench/reference_recall.py --n 50000 --d 256 --n-clusters 100 --n-dups 2000
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _truth(candidates: np.ndarray, references: np.ndarray, eps: float) -> np.ndarray:
    """Each candidate's best cosine to any reference row, in float64 blocks."""
    best = np.full(len(candidates), -np.inf)
    ref64 = references.astype(np.float64)
    for start in range(0, len(candidates), 4096):
        block = candidates[start:start + 4096].astype(np.float64) @ ref64.T
        best[start:start + 4096] = block.max(axis=1)
    return best.astype(np.float32) >= np.float32(1.0 - eps)


def _run(args, name: str, extra) -> dict:
    import pyarrow.parquet as pq

    from beam_curator.cli import run_pipeline

    out = os.path.join(args.work, name)
    t0 = time.perf_counter()
    run_pipeline("dedup", ["--embeddings", os.path.join(args.work, "candidates"),
                           "--reference", os.path.join(args.work, "reference"),
                           "--output", out, "--runner", "FnApiRunner", "--eps", str(args.eps),
                           "--n_clusters", str(args.n_clusters), *extra])
    seconds = time.perf_counter() - t0
    files = glob.glob(os.path.join(out, "dedup", "reference_duplicates", "*.parquet"))
    found = set()
    for path in files:
        found.update(pq.read_table(path, columns=["id"]).column("id").to_pylist())
    return {"seconds": round(seconds, 1), "found": found}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000, help="candidates (and as many references)")
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--n-dups", type=int, default=2000)
    ap.add_argument("--n-clusters", type=int, default=100)
    ap.add_argument("--eps", type=float, default=0.01)
    ap.add_argument("--border-margin", type=float, default=0.03)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from bench.dedup import write_parquet
    from bench.synthetic import make_planted_embeddings

    args.work = tempfile.mkdtemp(prefix="bench-reference-")
    try:
        ids, vectors, pairs = make_planted_embeddings(2 * args.n, args.d, args.n_dups,
                                                      args.seed, min_sim=0.99, max_sim=0.9999)
        rng = np.random.default_rng(args.seed + 1)
        is_reference = rng.random(len(ids)) < 0.5
        is_reference[pairs[:, 0]] = True            # sources in the reference,
        is_reference[pairs[:, 1]] = False           # their near-copies among the candidates
        cand = np.flatnonzero(~is_reference)[:args.n]
        ref = np.flatnonzero(is_reference)[:args.n]
        write_parquet(os.path.join(args.work, "candidates"), [ids[i] for i in cand],
                      vectors[cand])
        write_parquet(os.path.join(args.work, "reference"), [ids[i] for i in ref],
                      vectors[ref])
        t0 = time.perf_counter()
        true = {ids[i] for i, hit in zip(cand, _truth(vectors[cand], vectors[ref], args.eps))
                if hit}
        brute_s = time.perf_counter() - t0
        del vectors
        runs = {"within_cluster": [],
                f"border_margin_{args.border_margin}": ["--border_margin",
                                                        str(args.border_margin)],
                "exact": ["--reference_exact", "true"]}
        report = {"benchmark": "reference_recall", "n_candidates": len(cand),
                  "n_reference": len(ref), "d": args.d, "n_clusters": args.n_clusters,
                  "eps": args.eps, "true_reference_duplicates": len(true),
                  "numpy_brute_force_s": round(brute_s, 1)}
        base = None
        for name, extra in runs.items():
            got = _run(args, name, extra)
            base = base or got["seconds"]
            report[name] = {"recall": round(len(got["found"] & true) / max(1, len(true)), 5),
                            "false_matches": len(got["found"] - true),
                            "seconds": got["seconds"],
                            "time_vs_within_cluster": round(got["seconds"] / base, 2)}
        print(json.dumps(report))
    finally:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
