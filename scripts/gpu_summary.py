"""The headline numbers of scripts/gpu_measure.sh, from whichever of its JSON files exist.

    python scripts/gpu_summary.py OUT_DIR

Reads gpu_dedup.json, gpu_embed.json, gpu_pipeline.json and gpu_compile.json; a missing file
or field prints as '-' (a step that failed or ran out of time), never as an error.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(directory: Path, name: str) -> dict:
    try:
        return json.loads((directory / name).read_text().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return {}


def _get(data, *path, default="-"):
    for key in path:
        if not isinstance(data, dict) or key not in data or data[key] is None:
            return default
        data = data[key]
    return data


def _pct(value, limit) -> str:
    try:
        return f"{100.0 * float(value) / float(limit):.0f} %"
    except (TypeError, ValueError, ZeroDivisionError):
        return "-"


def embed_lines(embed: dict, pipeline: dict, compiled: dict) -> list:
    limit = _get(embed, "model_limit_images_per_s", default=None) or _get(
        pipeline, "model_limit_images_per_s", default=None)
    alone = _get(embed, "handler", "model_alone_at_pipeline_forward")
    handler = _get(embed, "handler", "best_handler_images_per_s")
    profile = _get(embed, "handler", "profile", default={})
    lines = [f"GPU: {_get(embed, 'device_name')} (torch {_get(embed, 'torch')}, "
             f"{_get(embed, 'cpu_count')} cores); {_get(embed, 'arch')}, model limit {limit} "
             f"images/s",
             f"  model alone, forward of {_get(pipeline, 'pipeline', 'forward_batch_size')}: "
             f"{alone} images/s ({_pct(alone, limit)} of the limit)",
             f"  handler, best: {handler} images/s ({_pct(handler, limit)}); goal >= 3000: "
             f"{_get(embed, 'summary', 'handler_meets_goal')}"]
    if profile:
        lines.append(f"  handler profile: {profile.get('wall_ms_per_batch')} ms per "
                     f"{profile.get('images_per_batch')}-image batch, GPU kernels "
                     f"{profile.get('gpu_kernel_ms_per_batch')} ms "
                     f"({_pct(profile.get('gpu_busy_fraction'), 1)} busy)")
    for key, row in _get(compiled, "handler", "batches", default={}).items():
        lines.append(f"  compiled, batch/forward {key}: " + ", ".join(
            f"{k}={v}" for k, v in row.items() if k.startswith("compiled")))
    decode = _get(embed, "decode", default={})
    if decode:
        nv = decode.get("nvjpeg", {})
        lines += [f"decode of {decode.get('image_px')}-px JPEGs (+ resize/crop): Pillow "
                  f"{decode.get('pillow_one_core_images_per_s')}/s on one core, "
                  f"{decode.get('pillow_all_cores_images_per_s')}/s on {decode.get('cores')}; "
                  f"draft mode {decode.get('draft_one_core_images_per_s')}/s, "
                  f"{decode.get('draft_all_cores_images_per_s')}/s (pixels vs Pillow "
                  f"{decode.get('draft_vs_pillow_pixels')})",
                  f"  nvJPEG: {nv.get('decode_images_per_s', '-')}/s; nvJPEG + model "
                  f"{nv.get('decode_and_model_images_per_s', '-')}/s "
                  f"({nv.get('decode_and_model_over_model_alone', '-')} x model alone); pixels "
                  f"vs Pillow {nv.get('vs_pillow_pixels', '-')}"
                  + (f"; ERROR {nv['error']}" if nv.get("error") else "")]
    configs = _get(pipeline, "pipeline", "configs", default={})
    if configs:
        lines.append("pipeline `embed`, tars -> parquet (FnApiRunner):")
    for config, row in configs.items():
        if row.get("error"):
            lines.append(f"  {config}: ERROR {row['error'][-300:]}")
            continue
        usage = row.get("utilisation", {})
        window = row.get("images_per_s_in_gpu_window")
        lines.append(f"  {config}: {row.get('images_per_s')}/s over {row.get('wall_s')} s, "
                     f"{window}/s while the GPU worked (= {_ratio(window, alone)} x model "
                     f"alone); GPU busy {usage.get('gpu_busy_mean_pct_in_window')} %, CPU "
                     f"busy {usage.get('cpu_busy_mean_pct_in_window')} %")
        spy = row.get("py_spy", {})
        if spy.get("by_stage_pct"):
            lines.append(f"    py-spy ({spy.get('samples')} samples, {spy.get('processes')} "
                         f"processes): {spy['by_stage_pct']}")
        elif spy.get("error"):
            lines.append(f"    py-spy: {spy['error'][:300]}")
    best = _get(pipeline, "pipeline", "best_images_per_s", default=None)
    if best is not None:
        lines.append(f"  best {best}/s = {_ratio(best, alone)} x model alone; goal >= 0.9")
    return lines


def _ratio(a, b) -> str:
    try:
        return f"{float(a) / float(b):.3f}"
    except (TypeError, ValueError, ZeroDivisionError):
        return "-"


def dedup_lines(dedup: dict) -> list:
    if not dedup:
        return ["dedup: no result"]
    cpu, gpu = dedup.get("cpu", {}), dedup.get("gpu", {})
    same = dedup.get("same_centroids_differences", {})

    def stages(run):
        return ", ".join(f"{k[:-2]} {run.get(k, '-')}" for k in
                         ("kmeans_s", "assign_s", "pairwise_s", "rank_s", "total_s"))

    return [f"dedup {dedup.get('n')} x {dedup.get('d')}, k {dedup.get('n_clusters')} on "
            f"{dedup.get('device_name')}: k-means cpu {dedup.get('kmeans_cpu')}, gpu "
            f"{dedup.get('kmeans_gpu')}",
            f"  cpu s: {stages(cpu)}",
            f"  gpu s: {stages(gpu)}",
            f"  speedup cpu/gpu: {dedup.get('speedup_cpu_over_gpu')}",
            f"  with the cpu's centroids: decisions equal = {dedup.get('decisions_equal')}, "
            f"rows differing {same}",
            f"  recall of planted pairs: cpu {cpu.get('planted_recall')}, gpu "
            f"{gpu.get('planted_recall')}; own centroids: {dedup.get('own_centroids')}"]


def main(argv=None) -> None:
    directory = Path((argv or sys.argv[1:] or ["."])[0])
    embed = _load(directory, "gpu_embed.json")
    pipeline = _load(directory, "gpu_pipeline.json")
    compiled = _load(directory, "gpu_compile.json")
    print("\n".join(embed_lines(embed, pipeline, compiled)
                    + dedup_lines(_load(directory, "gpu_dedup.json"))))


if __name__ == "__main__":
    main()
