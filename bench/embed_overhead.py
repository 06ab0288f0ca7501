"""How much does Beam cost on top of the model? The `embed` pipeline vs a bare loop.

Both sides read the same generated shards, decode and preprocess every image the same way,
and run the same model (random weights, default ViT-B-32) at the same batch size and torch
thread count; both are timed end to end, model loading included. They run alternately in
one process, so machine noise hits both, and the script prints images/s of each and the
ratio pipeline / bare loop (goal >= 0.95).

    python bench/embed_overhead.py [--images 480] [--arch ViT-B-32] [--batch 64] [--rounds 2]
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


def bare_loop(shards, model_dir: str, batch_size: int) -> int:
    """decode + preprocess + forward, no Beam: what a hand-written script would do."""
    import torch

    from beam_curator.models import load_clip
    from beam_curator.schema import ShardSample
    from beam_curator.transforms.decode import (
        build_preprocess,
        normalization,
        open_rgb,
        read_preprocess_cfg,
    )
    from beam_curator.transforms.embed import LoadedClipModel, encode_pixels
    from beam_curator.webdataset import shard_samples

    clip = load_clip(os.path.join(model_dir, "clip"), device="cpu")
    preprocess_cfg = read_preprocess_cfg(model_dir)
    model = LoadedClipModel(clip.model, "cpu", None, *normalization(preprocess_cfg))
    preprocess = build_preprocess(preprocess_cfg)
    batch, n = [], 0
    for name, url in shards:
        for sample in shard_samples(name, url):
            if isinstance(sample, ShardSample) and sample.image_bytes:
                batch.append(preprocess(open_rgb(sample.image_bytes, 89_478_485)))
                if len(batch) == batch_size:
                    n += len(encode_pixels(model, torch.stack(batch)).numpy())
                    batch = []
    if batch:
        n += len(encode_pixels(model, torch.stack(batch)).numpy())
    return n


def beam_embed(input_glob: str, model_dir: str, out: str, batch_size: int) -> int:
    from beam_curator.cli import run_pipeline

    summary = run_pipeline("embed", [
        "--input", input_glob, "--output", out, "--model_dir", model_dir,
        "--runner", "FnApiRunner", "--inference_batch_size", str(batch_size),
        "--min_inference_batch_size", str(batch_size), "--overwrite", "true"])
    return summary["samples_read"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=480)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="store_true",
                        help="keep the working directory (model, shards, outputs: ~600 MB)")
    args = parser.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="bench-embed-")
    try:
        _measure(args, work)
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _measure(args, work: str) -> None:
    import torch

    from beam_curator.models import init_random
    from beam_curator.synthetic import make_dataset
    from beam_curator.transforms.read import list_shards

    data, models = os.path.join(work, "data"), os.path.join(work, "models")
    if not os.path.exists(os.path.join(models, "manifest.json")):
        init_random(models, arch=args.arch, seed=0)
    make_dataset(data, n_shards=args.shards, per_shard=args.images // args.shards, seed=0,
                 size=64, n_exact=0, n_near=0, n_corrupt=0)
    input_glob = os.path.join(data, "*.tar")
    shards = list_shards(input_glob)

    rates = {"bare": [], "beam": []}
    for r in range(args.rounds):
        t = time.perf_counter()
        n = bare_loop(shards, models, args.batch)
        rates["bare"].append(n / (time.perf_counter() - t))
        t = time.perf_counter()
        n = beam_embed(input_glob, models, os.path.join(work, "out"), args.batch)
        rates["beam"].append(n / (time.perf_counter() - t))
        print(f"round {r}: bare {rates['bare'][-1]:.2f} img/s, beam embed "
              f"{rates['beam'][-1]:.2f} img/s", flush=True)
    bare, beam_rate = statistics.median(rates["bare"]), statistics.median(rates["beam"])
    # Each round's two sides ran back to back: their ratio is less exposed to a neighbour's
    # load that comes and goes than the ratio of the medians.
    paired = [b / a for a, b in zip(rates["bare"], rates["beam"])]
    print(json.dumps({"benchmark": "embed_overhead", "arch": args.arch, "images": args.images,
                      "batch": args.batch, "torch_threads": torch.get_num_threads(),
                      "bare_img_s": round(bare, 2), "beam_img_s": round(beam_rate, 2),
                      "ratio": round(beam_rate / bare, 3),
                      "median_round_ratio": round(statistics.median(paired), 3),
                      "rounds": rates}))


if __name__ == "__main__":
    main()
