"""Beam `dedup` vs a plain faiss + numpy script on the same embeddings parquet, in one run.

Writes N synthetic 768-d embeddings with planted near-duplicate pairs to parquet, then runs,
each in its own child process (so peak RSS is each one's own):
  * plain: read the parquet into one array, faiss k-means on the hash-sampled rows, assign,
    per-cluster pairwise (bench/dedup_plain.py) — the same work and the same k and eps;
  * beam:  `python -m beam_curator dedup` on the local FnApiRunner (staged vectors).
Prints wall time of each, the ratio beam / plain (goal <= 1.5), peak RSS / raw embedding
bytes (goal <= 1.5), whether both found the same duplicates, and the recall of the planted
pairs (a pair counts as found when one member is removed). `--repeat R` runs plain and
Beam alternately R times on the same data and reports every pair's ratio and their median:
on a shared machine one pair's ratio moves by ±15 % with the load.

    python bench/dedup.py --n 1000000 --n-clusters 1000 --n-dups 10000 --repeat 3

`--step-times` adds the seconds spent inside each Beam dedup step (sample, train, assign,
route, pairwise, write_outputs): where the Beam side's time goes, beside the plain script's
own timings.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def write_parquet(directory: str, ids, vectors: np.ndarray, rows_per_file: int = 100_000):
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(directory, exist_ok=True)
    d = vectors.shape[1]
    for f, start in enumerate(range(0, len(ids), rows_per_file)):
        stop = min(len(ids), start + rows_per_file)
        flat = pa.array(vectors[start:stop].reshape(-1), type=pa.float32())
        offsets = pa.array(np.arange(0, (stop - start + 1) * d, d, dtype=np.int32))
        table = pa.table({"id": ids[start:stop],
                          "embedding": pa.ListArray.from_arrays(offsets, flat)})
        pq.write_table(table, os.path.join(directory, f"part-{f:05d}.parquet"),
                       row_group_size=8192)


def child_plain(args) -> dict:
    import pyarrow.parquet as pq

    from beam_curator.transforms.semdedup.sources import list_column_to_numpy
    from bench.dedup_plain import plain_semdedup

    t0 = time.perf_counter()
    files = sorted(glob.glob(os.path.join(args.data, "*.parquet")))
    ids, parts = [], []
    for path in files:
        table = pq.read_table(path)
        ids += table.column("id").to_pylist()
        parts.append(list_column_to_numpy(table.column("embedding")))
        del table
    vectors = np.concatenate(parts)
    del parts
    result = plain_semdedup(vectors, ids, args.n_clusters, args.n_iter, args.eps, "hard",
                            args.seed, args.sample_size, block_size=args.block_size)
    return {"seconds": time.perf_counter() - t0, "duplicates": result.duplicates,
            "timings": result.timings}


def _time_steps() -> dict:
    """Seconds spent inside each dedup step's DoFn (and the trainer), filled in as it runs.

    Each wrapped `process` runs to the end before Beam sees its outputs, so the seconds are
    the step's own work: Beam's coding and shuffles are in what is left of the wall time.
    For attribution only (`--step-times`); the timed numbers come from unwrapped runs.
    """
    from beam_curator.transforms.semdedup import assign, centroids, outputs, pairwise, route

    seconds = {}

    def timed(function, label):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            result = function(*a, **k)
            if label != "train":
                result = list(result or [])
            seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - t0
            return result
        return wrapper

    for cls, label in ((centroids.SampleForTrainingFn, "sample"), (assign.AssignFn, "assign"),
                       (route.RouteFn, "route"), (pairwise.PairwiseFn, "pairwise"),
                       (outputs.WriteClusterOutputsFn, "write_outputs")):
        cls.process = timed(cls.process, label)
    # k-means itself: looked up on its module when called (a patched train_centroids would be
    # pickled into the graph with a copy of `seconds`)
    centroids.km.train_kmeans = timed(centroids.km.train_kmeans, "train")
    return seconds


def child_beam(args) -> dict:
    from beam_curator.cli import run_pipeline

    steps = _time_steps() if args.step_times else None
    t0 = time.perf_counter()
    out = os.path.join(args.work, "beam-out")
    run_pipeline("dedup", [
        "--embeddings", os.path.join(args.data, "*.parquet"), "--output", out,
        "--runner", "FnApiRunner", "--n_clusters", str(args.n_clusters),
        "--kmeans_iterations", str(args.n_iter), "--eps", str(args.eps),
        "--kmeans_seed", str(args.seed), "--kmeans_sample_size", str(args.sample_size),
        "--pairwise_block_size", str(args.block_size), "--overwrite", "true"]
        + (["--border_margin", str(args.border_margin)] if args.border_margin is not None else []))
    seconds = time.perf_counter() - t0
    import pyarrow.parquet as pq

    dups = sorted(pq.ParquetDataset(os.path.join(out, "dedup", "duplicates")).read()
                  .column("id").to_pylist())
    result = {"seconds": seconds, "duplicates": dups}
    if steps is not None:
        result["step_seconds"] = {k: round(v, 1) for k, v in steps.items()}
    return result


def run_child(kind: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--data", args.data,
           "--work", args.work, "--n-clusters", str(args.n_clusters), "--n-iter",
           str(args.n_iter), "--eps", str(args.eps), "--seed", str(args.seed),
           "--sample-size", str(args.sample_size), "--block-size", str(args.block_size)]
    if args.border_margin is not None:
        cmd += ["--border-margin", str(args.border_margin)]
    if args.step_times and kind == "beam":
        cmd += ["--step-times"]
    # Each side starts with no dirty pages of the other (the data just generated, the other
    # side's outputs), so neither pays for the other's writeback.
    os.sync()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-5000:])
        raise SystemExit(f"{kind} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--n-dups", type=int, default=2000)
    ap.add_argument("--n-clusters", type=int, default=200)
    ap.add_argument("--n-iter", type=int, default=20)
    ap.add_argument("--eps", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample-size", type=int, default=100_000)
    ap.add_argument("--block-size", type=int, default=4096)
    ap.add_argument("--border-margin", type=float, default=None,
                    help="Beam side only: also place border points in their second cluster")
    ap.add_argument("--skip-plain", action="store_true", help="only the Beam side (recall)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="plain and Beam alternately this many times; the median ratio")
    ap.add_argument("--step-times", action="store_true",
                    help="Beam side: the seconds inside each dedup step (attribution only)")
    ap.add_argument("--work", default=None)
    ap.add_argument("--keep", action="store_true",
                    help="keep the working directory (embeddings, outputs; ~3 GB at 1M)")
    ap.add_argument("--data", default=None)
    ap.add_argument("--child", choices=("plain", "beam"))
    args = ap.parse_args()

    if args.child:
        result = (child_plain if args.child == "plain" else child_beam)(args)
        result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps(result))
        return

    made_work = args.work is None
    args.work = args.work or tempfile.mkdtemp(prefix="bench-dedup-")
    try:
        _compare(args)
    finally:
        if made_work and not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)


def _compare(args) -> None:
    from bench.synthetic import make_planted_embeddings

    args.data = os.path.join(args.work, "embeddings")
    ids, vectors, pairs = make_planted_embeddings(args.n, args.d, args.n_dups, args.seed)
    write_parquet(args.data, ids, vectors)
    raw_bytes = vectors.nbytes
    planted = [(ids[a], ids[b]) for a, b in pairs]
    del vectors

    plains, beams = [], []
    for _ in range(max(1, args.repeat)):
        if not args.skip_plain:
            plains.append(run_child("plain", args))
        beams.append(run_child("beam", args))
    # The pair with the median ratio (the lower middle one for an even count) stands for
    # the run; every pair's numbers are printed.
    ratios = [b["seconds"] / p["seconds"] for p, b in zip(plains, beams)]
    middle = sorted(range(len(beams)), key=lambda i: ratios[i] if ratios else 0)[
        (len(beams) - 1) // 2]
    plain = plains[middle] if plains else None
    beam = beams[middle]
    removed = set(beam["duplicates"])
    found = sum(1 for a, b in planted if a in removed or b in removed)
    report = {
        "benchmark": "dedup", "n": args.n, "d": args.d, "n_clusters": args.n_clusters,
        "eps": args.eps, "border_margin": args.border_margin, "planted_pairs": len(planted),
        "beam_s": round(beam["seconds"], 1),
        "raw_embedding_bytes": raw_bytes,
        "beam_peak_rss_over_raw": round(beam["peak_rss_bytes"] / raw_bytes, 3),
        "n_duplicates": len(beam["duplicates"]),
        "planted_recall": round(found / max(1, len(planted)), 5),
        "planted_pairs_losing_both": sum(1 for a, b in planted if a in removed and b in removed),
    }
    if "step_seconds" in beam:
        report["beam_step_seconds"] = beam["step_seconds"]
    if plain is not None:
        report.update({
            "plain_s": round(plain["seconds"], 1),
            "time_ratio_beam_over_plain": round(beam["seconds"] / plain["seconds"], 3),
            "plain_peak_rss_over_raw": round(plain["peak_rss_bytes"] / raw_bytes, 3),
            "same_duplicates": plain["duplicates"] == beam["duplicates"],
            "plain_timings": plain.get("timings")})
        if len(plains) > 1:
            report.update({
                "pairs_plain_s": [round(p["seconds"], 1) for p in plains],
                "pairs_beam_s": [round(b["seconds"], 1) for b in beams],
                "pairs_ratio": [round(r, 3) for r in ratios],
                "all_same_duplicates": all(p["duplicates"] == b["duplicates"] == beam[
                    "duplicates"] for p, b in zip(plains, beams))})
    print(json.dumps(report))


if __name__ == "__main__":
    main()
