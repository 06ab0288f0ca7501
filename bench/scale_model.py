"""Check docs/scaling.md's formulas against a measured `dedup`, at N and at a multiple of N.

Writes N synthetic 768-d embeddings (rows per cluster held constant: k = N / rows), runs
`dedup` on the runner named by the extra arguments (FnApiRunner by default) with the shuffle
transport (what distributed runners use), and prints, beside each measured number, what the
formula in docs/scaling.md predicts:

* rows and vector bytes routed through the cluster GroupByKey (formula: sum over clusters of
  n_c x nb_c rows, 4 d bytes each; one crossing when no cluster is split),
* the largest key (formula: <= ~2 x --pairwise_block_size rows) and the number of keys,
* similarities computed (formula: sum over clusters of n_c (n_c - 1) / 2),
* the side inputs: centroids k x d x 4 bytes, cluster sizes k entries,
* wall time; with --scale, the same at scale x N and the ratios (flat = bounded per-key
  memory and linear work).

    python bench/scale_model.py --n 50000 --rows-per-cluster 2000 --scale 4
    python bench/scale_model.py --n 100000 --scale 10 -- --runner FlinkRunner ...
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def measure(n: int, args, runner_args) -> dict:
    from beam_curator.options import curator_options
    from beam_curator.pipelines import build_pipeline
    from bench.dedup import write_parquet
    from bench.synthetic import make_planted_embeddings

    work = tempfile.mkdtemp(prefix="bench-scale-")
    try:
        ids, vectors, _ = make_planted_embeddings(n, args.d, n // 100, args.seed,
                                                  n_centers=max(1, n // args.rows_per_cluster))
        write_parquet(os.path.join(work, "emb"), ids, vectors, rows_per_file=10_000)
        del vectors
        k = max(1, n // args.rows_per_cluster)
        out = os.path.join(work, "out")
        options = curator_options([
            "--embeddings", os.path.join(work, "emb", "*.parquet"), "--output", out,
            "--n_clusters", str(k), "--dedup_vector_transport", "shuffle",
            "--pairwise_block_size", str(args.block_rows), "--kmeans_iterations", "10",
            *runner_args])
        started = time.perf_counter()
        pipeline, claim = build_pipeline("dedup", options)
        result = pipeline.run()
        result.wait_until_finish()
        claim.release(finished=True)
        seconds = time.perf_counter() - started
        with open(os.path.join(out, "summary.json")) as handle:
            summary = json.load(handle)
        counters = {m.key.metric.name: m.committed
                    for m in result.metrics().query()["counters"]}
        per_key = {m.key.metric.name: m.committed
                   for m in result.metrics().query()["distributions"]}["dedup_rows_per_key"]
        info = summary["dedup"]
        all_sizes = _cluster_sizes(out)
        nb = np.maximum(1, np.ceil(all_sizes / args.block_rows)).astype(np.int64)
        return {
            "n": n, "k": info["n_clusters"], "seconds": round(seconds, 1),
            "largest_cluster": info["largest_cluster"],
            "split_clusters": info["clusters_split_into_blocks"],
            "routed_rows": counters.get("dedup_routed_rows"),
            "routed_rows_formula": int((all_sizes * nb).sum()),
            "routed_vector_bytes": counters.get("dedup_routed_vector_bytes"),
            "routed_vector_bytes_formula": int((all_sizes * nb).sum()) * args.d * 4,
            "keys": per_key.count,
            "keys_formula": _keys(all_sizes, args.block_rows),
            "largest_key_rows": per_key.max,
            "largest_key_bound": 2 * args.block_rows,
            "similarities": counters.get("dedup_pairwise_similarities"),
            "similarities_formula": int((all_sizes * (all_sizes - 1) // 2).sum()),
            "centroids_bytes": os.path.getsize(os.path.join(out, "dedup", "centroids.npy")),
            "centroids_bytes_formula": info["n_clusters"] * args.d * 4,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _keys(sizes: np.ndarray, block_rows: int) -> int:
    """Pairwise keys: one per bin of whole clusters (blocks.pack_clusters), nb(nb+1)/2 per
    cluster cut into nb blocks."""
    from beam_curator.dedup import blocks

    present = {c: int(n) for c, n in enumerate(sizes) if n}
    nb = np.array([blocks.n_blocks(n, block_rows) for n in present.values()])
    bins = set(blocks.pack_clusters(present, block_rows).values())
    return len(bins) + int((nb[nb > 1] * (nb[nb > 1] + 1) // 2).sum())


def _cluster_sizes(out: str) -> np.ndarray:
    """Members per cluster, from the written kmeans/ files (block files summed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = os.path.join(out, "dedup", "kmeans")
    table = pa.concat_tables([pq.read_table(os.path.join(directory, f), columns=["centroid"])
                              for f in sorted(os.listdir(directory))])
    return np.bincount(table.column("centroid").to_numpy()).astype(np.int64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--scale", type=int, default=4, help="also run at scale x N (0: only N)")
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--rows-per-cluster", type=int, default=2000)
    ap.add_argument("--block-rows", type=int, default=16_384)
    ap.add_argument("--seed", type=int, default=0)
    args, runner_args = ap.parse_known_args()
    runner_args = [a for a in runner_args if a != "--"] or ["--runner", "FnApiRunner"]
    small = measure(args.n, args, runner_args)
    report = {"benchmark": "scale_model", "small": small}
    if args.scale:
        big = measure(args.n * args.scale, args, runner_args)
        report["big"] = big
        report["ratios_big_over_small"] = {
            key: round(big[key] / small[key], 3) for key in (
                "seconds", "routed_rows", "keys", "largest_key_rows", "similarities",
                "centroids_bytes") if small.get(key)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
