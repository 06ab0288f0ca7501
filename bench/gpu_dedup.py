"""SemDeDup on a GPU vs the CPU path, side by side in one run, with the same functions.

    python bench/gpu_dedup.py --n 1000000 --n-clusters 1000 --n-dups 10000   # on a GPU box
    python bench/gpu_dedup.py --n 20000 --d 64 --n-clusters 20 --n-dups 200 --device cpu
                                                          # the torch code on the CPU (smoke)

N synthetic 768-d embeddings with planted near-duplicate pairs (`bench/synthetic.py`), then the
plain SemDeDup of `bench/dedup_plain.py` (hash-sampled k-means training, assignment, the
per-cluster pairwise step) three times in this process:

  cpu      the CPU path: faiss-cpu k-means (torch k-means on the CPU if faiss is missing),
           numpy assignment and pairwise -- what a CPU worker runs today;
  gpu      everything on --device: faiss-gpu k-means if faiss sees the GPU, else torch
           k-means; torch assignment and pairwise;
  gpu_same the gpu path with the cpu run's centroids: its duplicates, max ids, scores and
           labels must EQUAL the cpu run's (the k-means backends start differently, so with
           their own centroids the two runs differ where k-means put a border differently).

Prints per-stage seconds and the cpu/gpu ratios, the equality checks, the planted-pair recall
of both runs, and as its last line one JSON object (also written to --out).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Dict

import numpy as np

if __package__ in (None, ""):  # run as a script: make `bench` and `beam_curator` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.dedup_plain import PlainResult, plain_semdedup  # noqa: E402
from bench.synthetic import make_planted_embeddings  # noqa: E402


def _recall(result: PlainResult, pairs: np.ndarray) -> Dict:
    removed = result.is_duplicate[pairs]
    return {"planted_recall": round(float(removed.any(axis=1).mean()), 5),
            "planted_pairs_losing_both": int(removed.all(axis=1).sum())}


def _run(name: str, vectors, ids, args, **kwargs) -> PlainResult:
    t0 = time.perf_counter()
    result = plain_semdedup(vectors, ids, args.n_clusters, args.n_iter, args.eps, "hard",
                            args.seed, args.sample_size, block_size=args.block_size, **kwargs)
    total = time.perf_counter() - t0
    result.timings["wall_s"] = total
    print(f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in result.timings.items())
          + f"; {len(result.duplicates)} duplicates", flush=True)
    return result


def _differences(a: PlainResult, b: PlainResult) -> Dict:
    """How many rows differ between two runs, field by field (0 everywhere = equal)."""
    out = {name: int(np.count_nonzero(getattr(a, name) != getattr(b, name)))
           for name in ("labels", "cosine_dist", "l2_dist", "max_row", "cosine_sim_score",
                        "is_duplicate")}
    out["same_duplicates"] = a.duplicates == b.duplicates
    return out


def main(argv=None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--n-dups", type=int, default=10_000)
    ap.add_argument("--n-clusters", type=int, default=1000)
    ap.add_argument("--n-iter", type=int, default=20)
    ap.add_argument("--eps", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample-size", type=int, default=100_000)
    ap.add_argument("--block-size", type=int, default=4096)
    ap.add_argument("--device", default="cuda",
                    help="device of the gpu runs (cpu: the torch code on the CPU, a smoke test)")
    ap.add_argument("--kmeans-backend", default=None, choices=(None, "faiss", "torch"),
                    help="k-means backend of the gpu run (default: faiss-gpu, else torch)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)

    import torch

    from beam_curator.dedup.kmeans import kmeans_engine

    on_gpu = args.device != "cpu" and torch.cuda.is_available()
    report: Dict = {"bench": "gpu_dedup", "n": args.n, "d": args.d, "n_clusters": args.n_clusters,
                    "eps": args.eps, "sample_size": args.sample_size,
                    "block_size": args.block_size, "python": platform.python_version(),
                    "torch": torch.__version__, "cpu_count": os.cpu_count(),
                    "device": args.device,
                    "device_name": torch.cuda.get_device_name(0) if on_gpu else "cpu",
                    "kmeans_cpu": "/".join(kmeans_engine(device="cpu")),
                    "kmeans_gpu": "/".join(kmeans_engine(device=args.device,
                                                         backend=args.kmeans_backend))}
    if args.device != "cpu" and not on_gpu:
        report["warning"] = f"--device {args.device} but no CUDA device is visible"

    t0 = time.perf_counter()
    ids, vectors, pairs = make_planted_embeddings(args.n, args.d, args.n_dups, args.seed)
    report["generate_s"] = round(time.perf_counter() - t0, 2)
    print(f"{args.n} x {args.d} embeddings with {args.n_dups} planted pairs in "
          f"{report['generate_s']} s; k-means: cpu {report['kmeans_cpu']}, gpu "
          f"{report['kmeans_gpu']}", flush=True)

    if on_gpu:   # CUDA context and cuBLAS handles: a one-off start-up cost, not dedup's
        from beam_curator.dedup import assign_to_centroids

        assign_to_centroids(vectors[:1000], vectors[:10], device=args.device)
    cpu = _run("cpu", vectors, ids, args)
    torch_device = {"device": args.device, "backend": "torch"}
    gpu = _run("gpu", vectors, ids, args, kmeans_backend=args.kmeans_backend, **torch_device)
    same = _run("gpu_same", vectors, ids, args, centroids=cpu.centroids, **torch_device)

    def stage_ratios(slow: PlainResult, fast: PlainResult, stages) -> Dict:
        return {k: round(slow.timings[k] / max(fast.timings[k], 1e-9), 2) for k in stages}

    for run in (cpu, gpu, same):
        run.timings["assign_and_pairwise_s"] = run.timings["assign_s"] + run.timings["pairwise_s"]
    all_stages = ("kmeans_s", "assign_s", "pairwise_s", "assign_and_pairwise_s", "total_s")

    report.update({
        "cpu": {**{k: round(v, 2) for k, v in cpu.timings.items()},
                "n_duplicates": len(cpu.duplicates), **_recall(cpu, pairs)},
        "gpu": {**{k: round(v, 2) for k, v in gpu.timings.items()},
                "n_duplicates": len(gpu.duplicates), **_recall(gpu, pairs)},
        "gpu_same_centroids": {**{k: round(v, 2) for k, v in same.timings.items()},
                               "n_duplicates": len(same.duplicates)},
        "speedup_cpu_over_gpu": stage_ratios(cpu, gpu, all_stages),
        "speedup_same_centroids": stage_ratios(cpu, same, all_stages[1:4]),
        "same_centroids_differences": _differences(cpu, same),
        "own_centroids": {
            "same_duplicates": cpu.duplicates == gpu.duplicates,
            "duplicates_only_cpu": len(set(cpu.duplicates) - set(gpu.duplicates)),
            "duplicates_only_gpu": len(set(gpu.duplicates) - set(cpu.duplicates))},
    })
    equal = report["same_centroids_differences"]
    report["decisions_equal"] = bool(equal["same_duplicates"] and equal["max_row"] == 0
                                     and equal["labels"] == 0)
    print(f"same centroids: decisions equal = {report['decisions_equal']} "
          f"({equal}); speedup cpu/gpu (k-means excluded): "
          f"assign {report['speedup_same_centroids']['assign_s']}x, pairwise "
          f"{report['speedup_same_centroids']['pairwise_s']}x; with each its own k-means: "
          f"total {report['speedup_cpu_over_gpu']['total_s']}x, k-means "
          f"{report['speedup_cpu_over_gpu']['kmeans_s']}x; recall cpu "
          f"{report['cpu']['planted_recall']}, gpu {report['gpu']['planted_recall']}",
          flush=True)
    line = json.dumps(report, sort_keys=True)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line)
    return report


if __name__ == "__main__":
    main()
