"""Throughput of the `embed` step on a GPU: the model handler alone, the Beam pipeline end to
end on one machine, CPU decode, and faiss k-means on GPU vs CPU -- side by side, in one run.

    python bench/gpu_embed.py                                  # ViT-L/14, bf16, CUDA
    python bench/gpu_embed.py --parts handler --batch-sizes 1024 --compile-modes default,max-autotune
    python bench/gpu_embed.py --device cpu --arch tiny         # smoke test (tests/)

Weights are random (`beam_curator.models.init_random`, the real layout and the real
architecture): throughput does not depend on the values. The model limit is the image tower's
FLOPs per image (counted from the open_clip config: 162 GFLOP for ViT-L/14 at 224 px) against
the card's dense bf16 peak (989 TFLOP/s on an H100 SXM -> ~6,100 images/s at 100 %).

(a) `OpenClipModelHandler.run_inference` on a list of uint8 (H, W, 3) images, as
    RunInference hands them over (stage in pinned memory + copy to the device + normalise
    + forward, in forwards of --forward_batch_size, + copy back), and `encode_pixels` on a
    forward already on the device (the model's own speed); for each batch size, at each
    forward size, and with each --compile-modes mode on CUDA.
(b) `python -m beam_curator embed` on synthetic shards (FnApiRunner, this machine), and the
    CPU decode + preprocess rate of one core, which bounds what one SDK process can feed.
(c) faiss k-means (`beam_curator.dedup.train_kmeans`), GPU vs CPU, when faiss sees a GPU.
(d) the host-side staging of a batch, before (stacking CHW views) vs now (`stage_pixels`).

The last line printed is one JSON object with every number.
"""
from __future__ import annotations

import argparse

import json
import logging
import os
import platform
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

if __package__ in (None, ""):  # run as a script: make `beam_curator` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from beam_curator.transforms.embed import DEFAULT_FORWARD_BATCH_CAP  # noqa: E402

GOAL_HANDLER_IMAGES_PER_S = 3000          # ViT-L/14 on one H100 (about half the model limit)

# Dense (no sparsity) bf16 tensor peak, TFLOP/s, by device-name fragment (first match wins).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4),   # GH200 matches H200: same peak
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0),
    ("A10", 125.0), ("T4", 65.0), ("V100", 125.0),
)



def vision_gflops(model_cfg: dict) -> float:
    """Forward FLOPs of the image tower for one image (multiply-add = 2 FLOPs)."""
    v = model_cfg["vision_cfg"]
    size = v.get("image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    patch, width, layers = v["patch_size"], v["width"], v["layers"]
    mlp = int(width * v.get("mlp_ratio", 4.0))
    tokens = (size // patch) ** 2 + 1                                 # + class token
    per_layer = 2 * tokens * (4 * width * width + 2 * width * mlp) + 4 * tokens * tokens * width
    patch_embed = 2 * (tokens - 1) * (3 * patch * patch) * width
    head = 2 * width * model_cfg["embed_dim"]
    return (layers * per_layer + patch_embed + head) / 1e9


def peak_tflops(device_name: str) -> Optional[float]:
    for fragment, tflops in PEAK_BF16_TFLOPS:
        if fragment.lower() in device_name.lower():
            return tflops
    return None


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _rate(fn, n_images: int, iters: int, warmup: int, device: str) -> float:
    """Images per second of fn() (which handles n_images), after warm-up."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return n_images * iters / (time.perf_counter() - start)


def _images(n: int, size: int, seed: int = 0) -> list:
    """n random (size, size, 3) uint8 images, as DecodeFn hands them to RunInference."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return list(torch.randint(0, 256, (n, size, size, 3), generator=gen, dtype=torch.uint8))


def _forward_sizes(batch_size: int, args) -> List[int]:
    asked = args.forward_sizes or [DEFAULT_FORWARD_BATCH_CAP, batch_size]
    return sorted({min(f, batch_size) for f in asked})


def bench_handler(model_dir: str, args, limit: Optional[float]) -> Dict:
    """(a): the ModelHandler alone, on synthetic uint8 batches, at each forward size."""
    import torch

    from beam_curator.transforms.embed import OpenClipModelHandler, encode_pixels

    def handler_for(batch_size, forward_size, compile_mode=None):
        return OpenClipModelHandler(model_dir, device=args.device, precision=args.precision,
                                    max_batch_size=batch_size, forward_batch_size=forward_size,
                                    compile_mode=compile_mode)

    t0 = time.perf_counter()
    loaded = handler_for(max(args.batch_sizes), None).load_model()
    _sync(loaded.device)
    out: Dict = {"load_s": round(time.perf_counter() - t0, 3), "device": loaded.device,
                 "weights": str(loaded.dtype).replace("torch.", "") if loaded.dtype
                 else "fp32", "batches": {}}
    visual_size = loaded.model.visual.image_size
    size = int(visual_size[0] if isinstance(visual_size, (tuple, list)) else visual_size)
    models = {"eager": loaded}
    if loaded.device == "cuda":
        for mode in args.compile_modes:
            models[f"compiled_{mode}"] = handler_for(max(args.batch_sizes), None,
                                                     mode).load_model()

    def model_alone(model, on_device):
        return lambda: encode_pixels(model, on_device)

    for bs in args.batch_sizes:
        examples = _images(bs, size)
        for fs in _forward_sizes(bs, args):
            row: Dict = {}
            try:
                handler = handler_for(bs, fs)
                on_device = torch.stack(examples[:fs]).to(loaded.device)
                for name, model in models.items():
                    prefix = "" if name == "eager" else f"{name}_"
                    if prefix:
                        t0 = time.perf_counter()
                        encode_pixels(model, on_device)            # compiles for this shape
                        _sync(loaded.device)
                        row[f"{prefix}compile_s"] = round(time.perf_counter() - t0, 1)
                    row[f"{prefix}model_images_per_s"] = _rate(
                        model_alone(model, on_device), fs, args.iters, args.warmup,
                        loaded.device)
                    row[f"{prefix}handler_images_per_s"] = _rate(
                        lambda: handler.run_inference(examples, model), bs, args.iters,
                        args.warmup, loaded.device)
                if loaded.device == "cuda":
                    row["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                    torch.cuda.reset_peak_memory_stats()
            except torch.cuda.OutOfMemoryError as exc:      # noqa: PERF203 - report, go on
                row["error"] = f"out of memory: {str(exc).splitlines()[0]}"
                torch.cuda.empty_cache()
            for key in [k for k in row if k.endswith("_images_per_s")]:
                row[key] = round(row[key], 1)
                if limit:
                    row[key.replace("_images_per_s", "_fraction_of_limit")] = round(
                        row[key] / limit, 3)
            out["batches"][f"{bs}/{fs}"] = row
            print(f"(a) batch {bs:>4}, forward {fs:>4}: "
                  + ", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    rows = list(out["batches"].values())
    out["best_handler_images_per_s"] = max(
        [v for r in rows for k, v in r.items() if k.endswith("handler_images_per_s")] or [0.0])
    out["best_model_images_per_s"] = max(
        [v for r in rows for k, v in r.items() if k.endswith("model_images_per_s")] or [0.0])
    return out


def bench_staging(args) -> Dict:
    """(d): host-side cost of turning a batch of decoded images into model input, per image:
    the handler before (CHW views stacked into a fresh tensor) vs now (`stage_pixels`: HWC
    images copied into one reused, on CUDA pinned, buffer). One CPU thread, as in an SDK
    process where the decode threads hold the other cores."""
    import torch

    from beam_curator.transforms.embed import stage_pixels

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images = _images(args.staging_images, args.staging_px, seed=1)
        chw_views = [image.permute(2, 0, 1) for image in images]   # what decode emitted
        pinned = _cuda_visible() and args.device != "cpu"
        before = _rate(lambda: torch.stack(chw_views), len(images), args.iters, args.warmup,
                       "cpu")
        now = _rate(lambda: stage_pixels(images, len(images), pinned), len(images),
                    args.iters, args.warmup, "cpu")
        # The copy alone, into a buffer that is already mapped: what staging costs once the
        # pinned-memory cache hands buffers back (on CPU a fresh buffer is page-faulted in).
        buffer = torch.empty((len(images), *images[0].shape), dtype=torch.uint8)
        reused = _rate(lambda: torch.stack(images, out=buffer), len(images), args.iters,
                       args.warmup, "cpu")
    finally:
        torch.set_num_threads(threads)
    out = {"images": len(images), "image_px": args.staging_px, "pinned": pinned,
           "before_ms_per_1000": round(1e6 / before, 2), "now_ms_per_1000": round(1e6 / now, 2),
           "copy_into_mapped_buffer_ms_per_1000": round(1e6 / reused, 2),
           "speedup": round(now / before, 2)}
    print(f"(d) host staging of {len(images)} images of {args.staging_px}px: before "
          f"{out['before_ms_per_1000']} ms per 1000 images, now {out['now_ms_per_1000']} "
          f"(pinned={pinned}): {out['speedup']}x; the copy alone into a mapped buffer "
          f"{out['copy_into_mapped_buffer_ms_per_1000']} ms", flush=True)
    return out


def bench_decode(shard: str, model_dir: str, n: int) -> Dict:
    """(b) part: decode + preprocess on one CPU core (what DecodeFn does per image)."""
    from beam_curator.transforms.decode import (ImageError, build_preprocess, open_rgb,
                                                read_preprocess_cfg)
    from beam_curator.options import DEFAULT_MAX_IMAGE_PIXELS

    preprocess = build_preprocess(read_preprocess_cfg(model_dir))
    images: List[bytes] = []
    with tarfile.open(shard) as tar:
        for member in tar:
            if member.name.rsplit(".", 1)[-1] in ("jpg", "png", "webp"):
                images.append(tar.extractfile(member).read())
    images = (images * (n // max(1, len(images)) + 1))[:n]
    done = 0
    start = time.perf_counter()
    for data in images:
        try:
            preprocess(open_rgb(data, DEFAULT_MAX_IMAGE_PIXELS))
            done += 1
        except ImageError:
            pass
    seconds = time.perf_counter() - start
    return {"images": len(images), "decoded": done,
            "images_per_s_per_core": round(done / seconds, 1)}


def bench_pipeline(model_dir: str, work: Path, args, limit: Optional[float]) -> Dict:
    """(b): `embed` end to end on the local runner, on synthetic shards."""
    from beam_curator import cli
    from beam_curator.synthetic import make_dataset

    per_shard = max(1, args.pipeline_images // args.pipeline_shards)
    t0 = time.perf_counter()
    total = per_shard * args.pipeline_shards
    planted = min(6, total // 10)            # make_dataset needs room for its planted copies
    dataset = make_dataset(str(work / "shards"), n_shards=args.pipeline_shards,
                           per_shard=per_shard, size=args.image_px, n_exact=planted,
                           n_near=planted, n_corrupt=min(1, planted))
    made_s = time.perf_counter() - t0
    argv = [f"--input={work / 'shards'}/*.tar", f"--output={work / 'embed-out'}",
            f"--model_dir={model_dir}", f"--device={args.device}",
            f"--precision={args.precision}",
            f"--inference_batch_size={args.pipeline_batch_size or max(args.batch_sizes)}",
            "--runner=FnApiRunner", "--overwrite=true", "--progress_interval=0"]
    if args.pipeline_min_batch_size:
        argv.append(f"--min_inference_batch_size={args.pipeline_min_batch_size}")
    if args.pipeline_workers > 1:
        argv += [f"--direct_num_workers={args.pipeline_workers}",
                 "--direct_running_mode=multi_processing"]
    t0 = time.perf_counter()
    summary = cli.run_pipeline("embed", argv)
    wall = time.perf_counter() - t0
    decode = bench_decode(dataset.shards[0], model_dir, args.decode_images)
    out = {"images": dataset.n_samples, "image_px": args.image_px,
           "inference_batch_sizes": [a.split("=", 1)[1] for a in argv
                                     if a.startswith(("--min_inference", "--inference"))],
           "shards": args.pipeline_shards, "sdk_workers": args.pipeline_workers,
           "make_data_s": round(made_s, 2), "wall_s": round(wall, 2),
           "images_per_s": round(dataset.n_samples / wall, 1),
           "embeddings_written": (summary.get("samples_read", 0)
                                  - summary.get("counts", {}).get("error", 0)),
           "decode": decode}
    if limit:
        out["fraction_of_limit"] = round(out["images_per_s"] / limit, 4)
    print(f"(b) pipeline: {out['images']} images of {args.image_px}px in {wall:.1f} s = "
          f"{out['images_per_s']} images/s (startup and model load included); CPU decode + "
          f"preprocess {decode['images_per_s_per_core']} images/s per core", flush=True)
    return out


def bench_kmeans(args) -> Dict:
    """(c): faiss k-means on GPU vs CPU, through beam_curator's own train_kmeans."""
    import numpy as np

    try:
        import faiss
    except ImportError as exc:
        return {"skipped": f"faiss not importable: {exc}"}
    from beam_curator.dedup import train_kmeans

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.kmeans_n, args.kmeans_d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    n_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    out: Dict = {"n": args.kmeans_n, "d": args.kmeans_d, "k": args.kmeans_k,
                 "iterations": args.kmeans_iters, "faiss_gpus": n_gpus,
                 "cpu_threads": faiss.omp_get_max_threads()}
    t0 = time.perf_counter()
    train_kmeans(x, args.kmeans_k, n_iter=args.kmeans_iters, seed=0, use_gpu=False)
    out["cpu_s"] = round(time.perf_counter() - t0, 3)
    if n_gpus > 0:
        t0 = time.perf_counter()
        train_kmeans(x, args.kmeans_k, n_iter=args.kmeans_iters, seed=0, use_gpu=True)
        out["gpu_s"] = round(time.perf_counter() - t0, 3)
        out["gpu_speedup"] = round(out["cpu_s"] / max(out["gpu_s"], 1e-9), 2)
    else:
        out["gpu_skipped"] = "faiss.get_num_gpus() == 0 (faiss-cpu, or no GPU)"
    print(f"(c) k-means n={args.kmeans_n} d={args.kmeans_d} k={args.kmeans_k}: "
          + ", ".join(f"{k}={v}" for k, v in out.items() if k.endswith(("_s", "speedup",
                                                                          "skipped"))),
          flush=True)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    p.add_argument("--arch", default="ViT-L-14",
                   help="open_clip architecture of the random weights, or 'tiny'")
    p.add_argument("--model-dir", default=None,
                   help="use this model dir instead of writing random weights")
    p.add_argument("--batch-sizes", default=None,
                   help="comma-separated (default 256,512 on CUDA, 8,16 on CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed batches (20 CUDA, 3 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed batches (3 CUDA, 1 CPU)")
    p.add_argument("--forward-sizes", default=None,
                   help="comma-separated --forward_batch_size values to time per batch size "
                        f"(default: {DEFAULT_FORWARD_BATCH_CAP} and the batch size)")
    p.add_argument("--compile", action="store_true",
                   help="CUDA: also time torch.compile (mode 'default') of the image tower")
    p.add_argument("--compile-modes", default="",
                   help="CUDA: comma-separated torch.compile modes to time, e.g. "
                        "default,max-autotune (--compile = default)")
    p.add_argument("--staging-images", type=int, default=256)
    p.add_argument("--staging-px", type=int, default=224)
    p.add_argument("--pipeline-images", type=int, default=None,
                   help="images through the Beam pipeline (4096 CUDA, 32 CPU; 0 = skip)")
    p.add_argument("--pipeline-shards", type=int, default=None, help="(8 CUDA, 2 CPU)")
    p.add_argument("--pipeline-workers", type=int, default=1,
                   help="FnApiRunner SDK workers (>1: multi_processing)")
    p.add_argument("--pipeline-batch-size", type=int, default=None,
                   help="--inference_batch_size of the pipeline (default: largest batch size)")
    p.add_argument("--pipeline-min-batch-size", type=int, default=None,
                   help="--min_inference_batch_size of the pipeline (default: the option's)")
    p.add_argument("--image-px", type=int, default=None,
                   help="side of the synthetic images (256 CUDA, 48 CPU)")
    p.add_argument("--decode-images", type=int, default=None, help="(512 CUDA, 32 CPU)")
    p.add_argument("--kmeans-n", type=int, default=None, help="(200000 CUDA, 2000 CPU; 0 = skip)")
    p.add_argument("--kmeans-d", type=int, default=None, help="(768 CUDA, 64 CPU)")
    p.add_argument("--kmeans-k", type=int, default=None, help="(1000 CUDA, 8 CPU)")
    p.add_argument("--kmeans-iters", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak of the card (default: by device name)")
    p.add_argument("--parts", default="handler,pipeline,kmeans,staging",
                   help="which parts to run (comma-separated subset of "
                        "handler,pipeline,kmeans,staging)")
    p.add_argument("--workdir", default=None, help="keep data and weights here (default: temp)")
    args = p.parse_args(argv)

    cuda = _cuda_visible() and args.device != "cpu"
    defaults = {"batch_sizes": "256,512" if cuda else "8,16", "iters": 20 if cuda else 3,
                "warmup": 3 if cuda else 1, "pipeline_images": 4096 if cuda else 32,
                "pipeline_shards": 8 if cuda else 2, "image_px": 256 if cuda else 48,
                "decode_images": 512 if cuda else 32, "kmeans_n": 200_000 if cuda else 2000,
                "kmeans_d": 768 if cuda else 64, "kmeans_k": 1000 if cuda else 8}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b.strip()]
    args.forward_sizes = ([int(f) for f in args.forward_sizes.split(",") if f.strip()]
                          if args.forward_sizes else None)
    args.compile_modes = [m.strip() for m in args.compile_modes.split(",") if m.strip()]
    if args.compile and "default" not in args.compile_modes:
        args.compile_modes.insert(0, "default")
    args.parts = {part.strip() for part in args.parts.split(",") if part.strip()}
    unknown = args.parts - {"handler", "pipeline", "kmeans", "staging"}
    if unknown:
        p.error(f"unknown --parts {sorted(unknown)}")
    return args


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv=None) -> Dict:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("beam_curator").setLevel(logging.INFO)   # device and precision lines
    args = parse_args(argv)
    import torch

    from beam_curator.models import check_model_dir, init_random
    from beam_curator.models.random_init import clip_model_cfg

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu-embed-"))
    work.mkdir(parents=True, exist_ok=True)
    results: Dict = {"bench": "gpu_embed", "arch": args.arch, "python": platform.python_version(),
                     "torch": torch.__version__, "cpu_count": os.cpu_count()}
    try:
        import apache_beam

        results["beam"] = apache_beam.__version__
        model_dir = args.model_dir
        if model_dir is None:
            model_dir = str(work / f"models-{args.arch}")
            if not (Path(model_dir) / "manifest.json").exists():
                t0 = time.perf_counter()
                init_random(model_dir, arch=args.arch)
                results["init_random_s"] = round(time.perf_counter() - t0, 2)
        manifest = check_model_dir(model_dir)
        config = json.loads((Path(model_dir) / "clip" / "open_clip_config.json").read_text())
        model_cfg = config.get("model_cfg") or clip_model_cfg(args.arch)
        gflops = vision_gflops(model_cfg)
        on_cuda = torch.cuda.is_available() and args.device != "cpu"
        name = (torch.cuda.get_device_name(0) if on_cuda
                else f"cpu ({platform.processor() or platform.machine()})")
        peak = args.peak_tflops or (peak_tflops(name) if on_cuda else None)
        limit = peak * 1e3 / gflops if peak else None
        results.update({"device_name": name, "random_weights": manifest.random_weights,
                        "gflop_per_image": float(f"{gflops:.4g}"), "peak_bf16_tflops": peak,
                        "model_limit_images_per_s": round(limit, 1) if limit else None,
                        "goal_handler_images_per_s": GOAL_HANDLER_IMAGES_PER_S})
        print(f"{args.arch}: {gflops:.4g} GFLOP/image on {name}; model limit "
              f"{results['model_limit_images_per_s']} images/s at {peak} TFLOP/s", flush=True)

        results["handler"] = (bench_handler(model_dir, args, limit) if "handler" in args.parts
                              else {"skipped": "--parts", "device": None})
        results["pipeline"] = (bench_pipeline(model_dir, work, args, limit)
                               if args.pipeline_images > 0 and "pipeline" in args.parts
                               else {"skipped": "--pipeline-images 0 or --parts"})
        results["staging"] = (bench_staging(args) if "staging" in args.parts
                              else {"skipped": "--parts"})
        results["kmeans"] = (bench_kmeans(args) if args.kmeans_n > 0 and "kmeans" in args.parts
                             else {"skipped": "--kmeans-n 0 or --parts"})

        best = results["handler"].get("best_handler_images_per_s")
        pipe = results["pipeline"].get("images_per_s")
        decode = results["pipeline"].get("decode", {}).get("images_per_s_per_core")
        results["summary"] = {
            "handler_images_per_s": best,
            "handler_fraction_of_limit": round(best / limit, 3) if (best and limit) else None,
            "handler_meets_goal": (best >= GOAL_HANDLER_IMAGES_PER_S
                                   if results["handler"].get("device") == "cuda" else None),
            "pipeline_images_per_s": pipe,
            "pipeline_fraction_of_limit": round(pipe / limit, 4) if (pipe and limit) else None,
            "pipeline_to_handler": round(pipe / best, 4) if (pipe and best) else None,
            "cpu_cores_to_feed_handler": round(best / decode, 2) if (best and decode) else None,
        }
        print("summary: " + ", ".join(f"{k}={v}" for k, v in results["summary"].items()),
              flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, sort_keys=True))
    return results


if __name__ == "__main__":
    main()
