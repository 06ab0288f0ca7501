"""What does the image-caption CLIP score add to `embed`? The same run with and without it.

Both sides run the `embed` pipeline on the same generated shards (each sample has a .txt
caption of ~8 words), the same model (random weights, default ViT-B-32) and batch size; they
alternate in one process, so machine noise hits both. Prints images/s of each and the ratio
of times with / without (goal <= 1.10: a caption forward is a few % of an image forward).

    python bench/clip_score_overhead.py [--images 512] [--arch ViT-B-32] [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def embed(input_glob: str, model_dir: str, out: str, batch: int, clip_score: bool) -> int:
    from beam_curator.cli import run_pipeline

    summary = run_pipeline("embed", [
        "--input", input_glob, "--output", out, "--model_dir", model_dir,
        "--runner", "FnApiRunner", "--inference_batch_size", str(batch),
        "--min_inference_batch_size", str(batch), "--overwrite", "true",
        "--progress_interval", "0", "--clip_score", str(clip_score).lower()])
    return summary["samples_read"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench-clip-score-")
    try:
        _measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _measure(args, work: str) -> None:
    from beam_curator.models import init_random
    from beam_curator.synthetic import make_dataset

    data, models = os.path.join(work, "data"), os.path.join(work, "models")
    init_random(models, arch=args.arch, seed=0)
    make_dataset(data, n_shards=args.shards, per_shard=args.images // args.shards, seed=0,
                 size=64, n_exact=0, n_near=0, n_corrupt=0)
    input_glob = os.path.join(data, "*.tar")
    seconds = {"without": [], "with": []}
    for r in range(args.rounds):
        for side, on in (("without", False), ("with", True)):
            t = time.perf_counter()
            n = embed(input_glob, models, os.path.join(work, "out-" + side), args.batch, on)
            seconds[side].append(time.perf_counter() - t)
        print(f"round {r}: without {n / seconds['without'][-1]:.2f} img/s, with "
              f"{n / seconds['with'][-1]:.2f} img/s", flush=True)
    paired = [w / wo for wo, w in zip(seconds["without"], seconds["with"])]
    print(json.dumps({"benchmark": "clip_score_overhead", "arch": args.arch,
                      "images": n, "batch": args.batch,
                      "without_img_s": round(n / statistics.median(seconds["without"]), 2),
                      "with_img_s": round(n / statistics.median(seconds["with"]), 2),
                      "time_ratio_median_of_rounds": round(statistics.median(paired), 3),
                      "seconds": seconds}))


if __name__ == "__main__":
    main()
