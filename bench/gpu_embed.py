"""Throughput of the `embed` step on one GPU box, side by side in one run: the model alone, the
model handler, CPU and GPU JPEG decode, and the Beam pipeline from tar shards to parquet.

    python bench/gpu_embed.py                                  # ViT-L/14, bf16, CUDA, all parts
    python bench/gpu_embed.py --parts handler --batch-sizes 1024 \
        --compile-modes default,max-autotune
    python bench/gpu_embed.py --device cpu --arch tiny         # smoke test (tests/)

Weights are random (`beam_curator.models.init_random`, the real layout and the real
architecture): throughput does not depend on the values. The model limit is the image tower's
FLOPs per image (counted from the open_clip config: 162 GFLOP for ViT-L/14 at 224 px) against
the card's dense bf16 peak (989 TFLOP/s on an H100/H200 SXM -> ~6,100 images/s at 100 %).
Images are photo-like JPEGs of --image-px (512 on CUDA) in webdataset shards.

(a) handler: `OpenClipModelHandler.run_inference` on a list of uint8 (H, W, 3) images, as
    RunInference hands them over, and `encode_pixels` on a forward already on the device (the
    model alone); for each batch size, forward size and --compile-modes mode; on CUDA a
    torch.profiler pass says how much of a handler batch the GPU was busy.
(b) pipeline: `python -m beam_curator embed` on the shards, one child process per
    --pipeline-configs entry (FnApiRunner; `multi_processing:16` = 16 SDK worker processes),
    with GPU and CPU utilisation sampled throughout; images/s over the whole run and over the
    window in which the GPU worked; on the first config, py-spy (--py-spy) sums where the
    processes spent their CPU.
(c) decode: Pillow decode + preprocess on one core and on every core (processes), the same
    with Pillow's JPEG draft mode, and on CUDA nvJPEG (`transforms.device_decode`): images/s,
    pixel differences against the Pillow path, and nvJPEG decode + model in one loop.
(d) staging: the host-side staging of a batch, before (stacking CHW views) vs now
    (`stage_pixels`).

The last line printed is one JSON object with every number (also written to --out).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make `bench` and `beam_curator` importable
    sys.path.insert(0, str(REPO))

from beam_curator.transforms.embed import DEFAULT_FORWARD_BATCH_CAP  # noqa: E402

GOAL_HANDLER_IMAGES_PER_S = 3000          # ViT-L/14 on one H100 (about half the model limit)
GOAL_PIPELINE_OVER_MODEL = 0.9            # `embed` from tars vs the model alone, same run

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
                        lambda h=handler, e=examples, m=model: h.run_inference(e, m), bs,
                        args.iters,
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
    # The yardstick of the pipeline: the eager model alone at the pipeline's forward size.
    at_forward = [(int(key.split("/")[0]), row) for key, row in out["batches"].items()
                  if int(key.split("/")[1]) == args.forward_size and "model_images_per_s" in row]
    if at_forward:
        out["model_alone_at_pipeline_forward"] = max(at_forward, key=lambda t: t[0])[1][
            "model_images_per_s"]
    bs = max(args.batch_sizes)
    out["profile"] = _profile_handler(handler_for(bs, min(args.forward_size, bs)),
                                      _images(bs, size), loaded)
    return out


def _profile_handler(handler, examples, loaded, batches: int = 2) -> Dict:
    """torch.profiler over a few handler batches: how much of the wall time the GPU ran
    kernels or copies, and the host operations that took the most time (on the CPU the GPU
    fields are 0)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    handler.run_inference(examples, loaded)          # warm
    _sync(loaded.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if loaded.device == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(batches):
            handler.run_inference(examples, loaded)
        _sync(loaded.device)
        wall = time.perf_counter() - start

    # GPU activity (kernels, copies) as time intervals; their union is when the GPU worked.
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == DeviceType.CUDA)
    busy_us, reach = 0, None
    for begin, end in spans:
        if reach is None or begin > reach:
            busy_us += end - begin
            reach = end
        elif end > reach:
            busy_us += end - reach
            reach = end
    averages = prof.key_averages()
    host = sorted((e for e in averages if e.device_type == DeviceType.CPU),
                  key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
    gpu = sorted((e for e in averages if e.device_type == DeviceType.CUDA),
                 key=lambda e: e.self_device_time_total, reverse=True)[:10]
    out = {"batches": batches, "images_per_batch": len(examples),
           "wall_ms_per_batch": round(1e3 * wall / batches, 1),
           "gpu_kernel_ms_per_batch": round(busy_us / 1e3 / batches, 1),
           "gpu_busy_fraction": round(busy_us / 1e6 / wall, 3),
           "top_host_ops_ms_per_batch": [(e.key, round(e.self_cpu_time_total / 1e3 / batches, 2))
                                         for e in host],
           "top_gpu_ops_ms_per_batch": [(e.key[:80],
                                         round(e.self_device_time_total / 1e3 / batches, 2))
                                        for e in gpu]}
    print(f"(a) profile: {out['wall_ms_per_batch']} ms per {len(examples)}-image batch, GPU "
          f"kernels {out['gpu_kernel_ms_per_batch']} ms ({out['gpu_busy_fraction']:.0%} busy)",
          flush=True)
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


# ---- (c) decode ---------------------------------------------------------------------------

def _shard_jpegs(shard: str) -> List[bytes]:
    with tarfile.open(shard) as tar:
        return [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]


def _pillow_decoder(model_dir: str, draft: bool):
    """bytes -> (S, S, 3) uint8 as DecodeFn makes it; with `draft`, Pillow's JPEG draft mode
    first (libjpeg scales by 1/2, 1/4 or 1/8 while decoding: cheaper, other pixels)."""
    from beam_curator.options import DEFAULT_MAX_IMAGE_PIXELS
    from beam_curator.transforms.decode import (
        build_preprocess,
        open_rgb,
        read_preprocess_cfg,
    )

    cfg = read_preprocess_cfg(model_dir)
    preprocess = build_preprocess(cfg)
    size = cfg.get("size", 224)
    size = max(size) if isinstance(size, (list, tuple)) else int(size)

    def decode(data: bytes):
        if draft:
            image = Image.open(io.BytesIO(data))
            image.draft("RGB", (size, size))
            return preprocess(image.convert("RGB"))
        return preprocess(open_rgb(data, DEFAULT_MAX_IMAGE_PIXELS))

    return decode


_POOL_WORK: Dict = {}     # what forked decode workers read (not pickled through the pool)


def _decode_share(worker: int) -> int:
    import torch

    torch.set_num_threads(1)
    decode, jpegs, n_workers = (_POOL_WORK[k] for k in ("decode", "jpegs", "workers"))
    done = 0
    for data in jpegs[worker::n_workers]:
        decode(data)
        done += 1
    return done


def _decode_rate(decode, jpegs: List[bytes], processes: int) -> float:
    """Images/s of `decode` over `jpegs`, on this process (1) or on `processes` forked ones."""
    if processes <= 1:
        start = time.perf_counter()
        for data in jpegs:
            decode(data)
        return len(jpegs) / (time.perf_counter() - start)
    import multiprocessing

    _POOL_WORK.update(decode=decode, jpegs=jpegs, workers=processes)
    context = multiprocessing.get_context("fork")
    with context.Pool(processes) as pool:
        pool.map(_decode_share, range(processes))           # warm: imports, first images
        start = time.perf_counter()
        done = sum(pool.map(_decode_share, range(processes)))
        seconds = time.perf_counter() - start
    return done / seconds


def bench_decode(shard: str, model_dir: str, args, model_alone: Optional[float]) -> Dict:
    """(c): decode + preprocess on one core, on all cores, with draft mode, and on the GPU."""
    import numpy as np
    import torch

    jpegs = _shard_jpegs(shard)
    one = (jpegs * (args.decode_images // max(1, len(jpegs)) + 1))[:args.decode_images]
    cores = os.cpu_count() or 1
    every = one * cores
    exact, draft = _pillow_decoder(model_dir, False), _pillow_decoder(model_dir, True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out: Dict = {"image_px": args.image_px, "cores": cores,
                     "pillow_one_core_images_per_s": round(_decode_rate(exact, one, 1), 1),
                     "draft_one_core_images_per_s": round(_decode_rate(draft, one, 1), 1)}
        out["pillow_all_cores_images_per_s"] = round(_decode_rate(exact, every, cores), 1)
        out["draft_all_cores_images_per_s"] = round(_decode_rate(draft, every, cores), 1)
    finally:
        torch.set_num_threads(threads)
    sample = jpegs[:32]
    reference = np.stack([exact(d).numpy() for d in sample]).astype(np.int16)
    out["draft_vs_pillow_pixels"] = _pixel_difference(
        np.stack([draft(d).numpy() for d in sample]), reference)
    if model_alone:
        out["cores_to_feed_model_alone"] = round(
            model_alone / out["pillow_one_core_images_per_s"], 1)
    print(f"(c) decode + preprocess of {args.image_px}px JPEGs: Pillow "
          f"{out['pillow_one_core_images_per_s']}/s on one core, "
          f"{out['pillow_all_cores_images_per_s']}/s on {cores} cores; draft mode "
          f"{out['draft_one_core_images_per_s']}/s, {out['draft_all_cores_images_per_s']}/s",
          flush=True)
    if args.device != "cpu" and _cuda_visible():
        out["nvjpeg"] = _bench_device_decode(jpegs, model_dir, args, reference, sample,
                                             model_alone)
    return out


def _pixel_difference(got, want) -> Dict:
    import numpy as np

    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    return {"max": int(diff.max()), "mean": round(float(diff.mean()), 4),
            "share_over_2": round(float((diff > 2).mean()), 6)}


def _bench_device_decode(jpegs, model_dir, args, reference, sample, model_alone) -> Dict:
    """nvJPEG decode + resize/crop on the GPU: rate, pixels against Pillow's, and decode +
    model in one loop (what the pipeline could reach with decode on the GPU)."""
    import torch

    from beam_curator.transforms.decode import read_preprocess_cfg
    from beam_curator.transforms.device_decode import DeviceJpegDecoder
    from beam_curator.transforms.embed import OpenClipModelHandler, encode_pixels

    decoder = DeviceJpegDecoder(read_preprocess_cfg(model_dir), "cuda")
    batch = (jpegs * (args.forward_size // max(1, len(jpegs)) + 1))[:args.forward_size]
    out: Dict = {"batch": len(batch)}
    try:
        out["decode_images_per_s"] = round(_rate(lambda: decoder(batch), len(batch),
                                                 args.iters, args.warmup, "cuda"), 1)
        got = decoder(sample).cpu().numpy()
        out["vs_pillow_pixels"] = _pixel_difference(got, reference)
        loaded = OpenClipModelHandler(model_dir, device="cuda",
                                      precision=args.precision).load_model()
        out["decode_and_model_images_per_s"] = round(_rate(
            lambda: encode_pixels(loaded, decoder(batch)), len(batch), args.iters,
            args.warmup, "cuda"), 1)
        if model_alone:
            out["decode_and_model_over_model_alone"] = round(
                out["decode_and_model_images_per_s"] / model_alone, 3)
        out["fallbacks_to_cpu"] = decoder.fallbacks
    except Exception as exc:   # noqa: BLE001 - report it; the other parts go on
        out["error"] = f"{type(exc).__name__}: {exc}"
    torch.cuda.empty_cache()
    print(f"(c) nvJPEG: {out}", flush=True)
    return out


# ---- (b) the pipeline -----------------------------------------------------------------------

def _parse_config(config: str) -> Tuple[List[str], Dict[str, str]]:
    """'MODE:WORKERS[:large_model][:option=value][:env.NAME=value]...' -> (pipeline flags,
    environment of the run); e.g. 'multi_processing:16:env.OMP_NUM_THREADS=1'."""
    mode, workers, *extra = config.split(":") + ([] if ":" in config else ["1"])
    argv, env = [], {}
    if mode in ("multi_processing", "multi_threading"):
        argv += [f"--direct_num_workers={int(workers)}", f"--direct_running_mode={mode}"]
    elif mode != "in_process":
        raise ValueError(f"unknown pipeline mode {mode!r} in {config!r}")
    for item in extra:
        if item == "large_model":
            argv.append("--large_model=true")
        elif item.startswith("env.") and "=" in item:
            name, value = item[4:].split("=", 1)
            env[name] = value
        elif "=" in item:
            argv.append(f"--{item}")
        else:
            raise ValueError(f"unknown pipeline setting {item!r} in {config!r}")
    return argv, env


def _child_pipeline(spec_path: str) -> None:
    """Run one `embed` in this (child) process; print its summary as JSON."""
    from beam_curator import cli

    spec = json.loads(Path(spec_path).read_text())
    start = time.perf_counter()
    summary = cli.run_pipeline("embed", spec["argv"])
    print(json.dumps({"wall_s": time.perf_counter() - start, "summary": summary}))


def _run_pipeline_config(config: str, shards: List[str], model_dir: str, work: Path, args,
                         profile: bool) -> Dict:
    from bench.gpu_monitor import UtilisationSampler, record_stacks

    name = "".join(c if c.isalnum() or c in "._" else "-" for c in config)
    out_dir = work / f"embed-out-{name}"
    extra_argv, extra_env = _parse_config(config)
    argv = [f"--input={','.join(shards)}", f"--output={out_dir}", f"--model_dir={model_dir}",
            f"--device={args.device}", f"--precision={args.precision}",
            f"--inference_batch_size={args.pipeline_batch_size}",
            f"--forward_batch_size={args.forward_size}", "--runner=FnApiRunner",
            "--overwrite=true", "--progress_interval=0", *extra_argv]
    spec = work / f"spec-{name}.json"
    spec.write_text(json.dumps({"argv": argv}))
    env = {**os.environ, **extra_env, "PYTHONPATH": os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    row: Dict = {"config": config, "argv_extra": extra_argv, "env_extra": extra_env}
    # Output to files, not pipes: the SDK workers inherit them, and a full pipe nobody reads
    # while py-spy runs would stall the pipeline being measured.
    stdout_path, stderr_path = work / f"stdout-{name}.txt", work / f"stderr-{name}.txt"
    with UtilisationSampler(args.sample_interval) as sampler, \
            open(stdout_path, "w") as stdout, open(stderr_path, "w") as stderr:
        child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()),
                                  "--child-pipeline", str(spec)], stdout=stdout,
                                 stderr=stderr, env=env, cwd=work)
        stacks = None
        if profile:
            stacks = _profile_when_busy(child, sampler, work, args, record_stacks)
        child.wait()
    if child.returncode != 0:
        row["error"] = f"exit {child.returncode}: {stderr_path.read_text()[-3000:]}"
        print(f"(b) pipeline {config}: FAILED {row['error'][-500:]}", flush=True)
        return row
    result = json.loads(stdout_path.read_text().strip().splitlines()[-1])
    summary = result["summary"]
    embedded = summary.get("samples_read", 0) - summary.get("counts", {}).get("error", 0)
    usage = sampler.summary()
    row.update({"images": summary.get("samples_read"), "embedded": embedded,
                "wall_s": round(result["wall_s"], 2),
                "images_per_s": round(embedded / result["wall_s"], 1), "utilisation": usage})
    if usage.get("gpu_window_s"):
        row["images_per_s_in_gpu_window"] = round(embedded / usage["gpu_window_s"], 1)
    if stacks is not None:
        row["py_spy"] = stacks
    shutil.rmtree(out_dir, ignore_errors=True)
    print(f"(b) pipeline {config}: {embedded} images in {row['wall_s']} s = "
          f"{row['images_per_s']}/s (startup included), "
          f"{row.get('images_per_s_in_gpu_window')}/s while the GPU worked; "
          f"GPU busy {usage.get('gpu_busy_mean_pct_in_window')} %, CPU busy "
          f"{usage.get('cpu_busy_mean_pct_in_window')} % in that window", flush=True)
    return row


def _profile_when_busy(child, sampler, work: Path, args, record_stacks) -> Dict:
    """py-spy on the child and its workers, once the GPU is working (or after a minute; with
    no GPU to watch, after --py-spy-delay seconds)."""
    deadline = time.perf_counter() + (60 if sampler.gpu_readable else args.py_spy_delay)
    while child.poll() is None and time.perf_counter() < deadline:
        if any(s[1] is not None and s[1] >= 5 for s in sampler.samples):
            break
        time.sleep(0.5)
    if child.poll() is not None:
        return {"error": "the pipeline ended before py-spy started"}
    return record_stacks(args.py_spy, child.pid, args.py_spy_seconds, work / "py-spy.txt")


def bench_pipeline(model_dir: str, shards: List[str], work: Path, args,
                   limit: Optional[float], checkpoint=None) -> Dict:
    """(b): `embed` end to end on the local runner, one child process per config;
    `checkpoint(partial results)` after each one."""
    out: Dict = {"image_px": args.image_px, "shards": len(shards),
                 "inference_batch_size": args.pipeline_batch_size,
                 "forward_batch_size": args.forward_size, "configs": {}}
    for k, config in enumerate(args.pipeline_configs):
        profile = bool(args.py_spy) and k == 0
        try:
            row = _run_pipeline_config(config, shards, model_dir, work, args, profile)
        except Exception as exc:   # noqa: BLE001 - report it; the other configs go on
            row = {"config": config, "error": f"{type(exc).__name__}: {exc}"}
        if limit and row.get("images_per_s"):
            row["fraction_of_limit"] = round(row["images_per_s"] / limit, 4)
        out["configs"][config] = row
        if checkpoint:
            checkpoint(out)
    rates = [r.get("images_per_s_in_gpu_window") or r.get("images_per_s") or 0
             for r in out["configs"].values()]
    out["best_images_per_s"] = max(rates or [0])
    return out


# ---- the run --------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    p.add_argument("--arch", default="ViT-L-14",
                   help="open_clip architecture of the random weights, or 'tiny'")
    p.add_argument("--model-dir", default=None,
                   help="use this model dir instead of writing random weights")
    p.add_argument("--parts", default="handler,decode,pipeline,staging",
                   help="comma-separated subset of handler,decode,pipeline,staging")
    p.add_argument("--batch-sizes", default=None,
                   help="(a) comma-separated (default 1024 on CUDA, 8,16 on CPU)")
    p.add_argument("--forward-sizes", default=None,
                   help="(a) comma-separated --forward_batch_size values to time per batch "
                        f"size (default: {DEFAULT_FORWARD_BATCH_CAP} and the batch size)")
    p.add_argument("--iters", type=int, default=None, help="timed batches (10 CUDA, 3 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed batches (3 CUDA, 1 CPU)")
    p.add_argument("--compile", action="store_true",
                   help="CUDA: also time torch.compile (mode 'default') of the image tower")
    p.add_argument("--compile-modes", default="",
                   help="(a) CUDA: comma-separated torch.compile modes to time, e.g. "
                        "default,max-autotune (--compile = default)")
    p.add_argument("--image-px", type=int, default=None,
                   help="side of the synthetic JPEGs (512 CUDA, 48 CPU)")
    p.add_argument("--pipeline-images", type=int, default=None,
                   help="(b) images in the shards (24576 CUDA, 32 CPU)")
    p.add_argument("--pipeline-shards", type=int, default=None, help="(b) (24 CUDA, 2 CPU)")
    p.add_argument("--pipeline-configs", default=None,
                   help="(b) comma-separated FnApiRunner setups, each MODE:WORKERS[:large_model]"
                        "[:option=value][:env.NAME=value]; MODE in_process, multi_processing "
                        "or multi_threading "
                        "(default on CUDA: multi_processing:CORES and "
                        "multi_processing:CORES:large_model; on CPU in_process:1)")
    p.add_argument("--pipeline-batch-size", type=int, default=None,
                   help="(b) --inference_batch_size (256 CUDA, 16 CPU)")
    p.add_argument("--forward-size", type=int, default=None,
                   help="(b, c) --forward_batch_size of the pipeline and the nvJPEG loop "
                        "(256 CUDA, 8 CPU)")
    p.add_argument("--sample-interval", type=float, default=0.25,
                   help="(b) seconds between GPU/CPU utilisation samples")
    p.add_argument("--py-spy", default=None,
                   help="(b) path of a py-spy binary: profile the first pipeline config")
    p.add_argument("--py-spy-seconds", type=float, default=10.0)
    p.add_argument("--py-spy-delay", type=float, default=8.0,
                   help="(b) with no GPU to watch: seconds before py-spy starts")
    p.add_argument("--decode-images", type=int, default=None,
                   help="(c) images decoded per core (256 CUDA, 16 CPU)")
    p.add_argument("--staging-images", type=int, default=256)
    p.add_argument("--staging-px", type=int, default=224)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak of the card (default: by device name)")
    p.add_argument("--workdir", default=None, help="keep data and weights here (default: temp)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--child-pipeline", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_pipeline:
        return args

    cuda = _cuda_visible() and args.device != "cpu"
    cores = os.cpu_count() or 1
    defaults = {"batch_sizes": "1024" if cuda else "8,16", "iters": 10 if cuda else 3,
                "warmup": 3 if cuda else 1, "pipeline_images": 24576 if cuda else 32,
                "pipeline_shards": 24 if cuda else 2, "image_px": 512 if cuda else 48,
                "decode_images": 256 if cuda else 16,
                "pipeline_batch_size": 256 if cuda else 16, "forward_size": 256 if cuda else 8,
                "pipeline_configs": (f"multi_processing:{cores},"
                                     f"multi_processing:{cores}:large_model" if cuda
                                     else "in_process:1")}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b.strip()]
    args.forward_sizes = ([int(f) for f in args.forward_sizes.split(",") if f.strip()]
                          if args.forward_sizes else None)
    args.compile_modes = [m.strip() for m in args.compile_modes.split(",") if m.strip()]
    if args.compile and "default" not in args.compile_modes:
        args.compile_modes.insert(0, "default")
    args.pipeline_configs = [c.strip() for c in args.pipeline_configs.split(",") if c.strip()]
    for config in args.pipeline_configs:
        try:
            _parse_config(config)
        except ValueError as exc:
            p.error(str(exc))
    args.parts = {part.strip() for part in args.parts.split(",") if part.strip()}
    unknown = args.parts - {"handler", "decode", "pipeline", "staging"}
    if unknown:
        p.error(f"unknown --parts {sorted(unknown)}")
    return args


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def _part(results: Dict, name: str, fn, out: Optional[str]) -> Dict:
    """Run one part; an exception is reported in its place and the other parts still run.
    The results so far are written to `out` after every part (a run killed by a time limit
    still leaves them)."""
    try:
        results[name] = fn()
    except Exception as exc:   # noqa: BLE001 - fail soft: every part reports
        import traceback

        traceback.print_exc()
        results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    if out:
        Path(out).write_text(json.dumps(results, sort_keys=True) + "\n")
    return results[name]


def _summary(results: Dict, limit: Optional[float]) -> Dict:
    handler, pipeline, decode = (results.get(k, {}) for k in ("handler", "pipeline", "decode"))
    best = handler.get("best_handler_images_per_s")
    alone = handler.get("model_alone_at_pipeline_forward")
    pipe = pipeline.get("best_images_per_s")
    summary = {
        "model_alone_images_per_s": alone,
        "handler_images_per_s": best,
        "handler_fraction_of_limit": round(best / limit, 3) if (best and limit) else None,
        "handler_meets_goal": (best >= GOAL_HANDLER_IMAGES_PER_S
                               if handler.get("device") == "cuda" and best else None),
        "pipeline_images_per_s": pipe,
        "pipeline_over_model_alone": round(pipe / alone, 3) if (pipe and alone) else None,
        "pipeline_meets_goal": (pipe / alone >= GOAL_PIPELINE_OVER_MODEL
                                if (pipe and alone and handler.get("device") == "cuda")
                                else None),
        "decode_pillow_all_cores_images_per_s": decode.get("pillow_all_cores_images_per_s"),
        "decode_nvjpeg_images_per_s": decode.get("nvjpeg", {}).get("decode_images_per_s"),
        "cores_to_feed_model_alone": decode.get("cores_to_feed_model_alone"),
    }
    return summary


def main(argv=None) -> Dict:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("beam_curator").setLevel(logging.INFO)   # device and precision lines
    args = parse_args(argv)
    if args.child_pipeline:
        _child_pipeline(args.child_pipeline)
        return {}
    import torch

    from beam_curator.models import check_model_dir, init_random
    from beam_curator.models.random_init import clip_model_cfg
    from bench.synthetic import write_jpeg_shards

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

        per_shard = max(1, args.pipeline_images // args.pipeline_shards)
        shard_dir = work / f"shards-{args.pipeline_shards}x{per_shard}-{args.image_px}px"
        shards = sorted(str(p) for p in shard_dir.glob("*.tar"))
        if len(shards) != args.pipeline_shards:    # else: made by an earlier run, same sizes
            t0 = time.perf_counter()
            shutil.rmtree(shard_dir, ignore_errors=True)
            shards = write_jpeg_shards(str(shard_dir), args.pipeline_shards, per_shard,
                                       args.image_px)
            results["make_shards_s"] = round(time.perf_counter() - t0, 2)

        if "handler" in args.parts:
            _part(results, "handler", lambda: bench_handler(model_dir, args, limit), args.out)
            if on_cuda:
                torch.cuda.empty_cache()
        alone = results.get("handler", {}).get("model_alone_at_pipeline_forward")
        if "decode" in args.parts:
            _part(results, "decode", lambda: bench_decode(shards[0], model_dir, args, alone),
                  args.out)
        if "pipeline" in args.parts and args.pipeline_images > 0:
            def checkpoint(partial):   # a time limit may end the run between configs
                if args.out:
                    Path(args.out).write_text(json.dumps({**results, "pipeline": partial},
                                                         sort_keys=True) + "\n")

            _part(results, "pipeline", lambda: bench_pipeline(model_dir, shards, work, args,
                                                              limit, checkpoint), args.out)
        if "staging" in args.parts:
            _part(results, "staging", lambda: bench_staging(args), args.out)
        results["summary"] = _summary(results, limit)
        print("summary: " + ", ".join(f"{k}={v}" for k, v in results["summary"].items()),
              flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    line = json.dumps(results, sort_keys=True)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line)
    return results


if __name__ == "__main__":
    main()
