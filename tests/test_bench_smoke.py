"""The GPU benchmarks (bench/gpu_embed.py, bench/gpu_dedup.py) in their tiny CPU modes: they stay
runnable where no GPU is, so a lent GPU machine never meets a silly bug first."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench(script, args, tmp_path, timeout=300):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])     # the last line is the JSON


def test_gpu_embed_bench_runs_on_cpu(tmp_path):
    results = _bench("gpu_embed.py", [
        "--device", "cpu", "--arch", "tiny", "--forward-sizes", "4,16", "--staging-images", "32",
        "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "embed.json")], tmp_path)
    assert json.loads((tmp_path / "embed.json").read_text()) == results
    handler = results["handler"]
    assert handler["device"] == "cpu" and handler["weights"] == "fp32"
    assert set(handler["batches"]) == {"8/4", "8/8", "16/4", "16/16"}   # batch/forward
    for row in handler["batches"].values():
        assert row["handler_images_per_s"] > 0 and row["model_images_per_s"] > 0
    assert handler["model_alone_at_pipeline_forward"] == handler["batches"]["8/8"][
        "model_images_per_s"]                                       # --forward-size 8 on CPU
    pipeline = results["pipeline"]["configs"]["in_process:1"]
    assert pipeline["images"] == 32 and pipeline["embedded"] == 32  # JPEG shards, none broken
    # the rate is the images embedded over the wall time the bench measured, not a constant
    assert pipeline["images_per_s"] == round(pipeline["embedded"] / pipeline["wall_s"], 1)
    assert pipeline["utilisation"]["gpu_readable"] is False
    decode = results["decode"]
    assert decode["pillow_one_core_images_per_s"] > 0 and decode["cores"] >= 1
    assert decode["pillow_all_cores_images_per_s"] > 0 and "nvjpeg" not in decode
    assert decode["draft_vs_pillow_pixels"]["max"] >= 0
    staging = results["staging"]
    assert staging["pinned"] is False and staging["now_ms_per_1000"] > 0
    assert results["random_weights"] is True and results["gflop_per_image"] > 0
    summary = results["summary"]
    assert summary["handler_meets_goal"] is None and summary["pipeline_meets_goal"] is None
    assert summary["pipeline_over_model_alone"] > 0


def test_gpu_dedup_bench_runs_on_cpu(tmp_path):
    """The torch code on the CPU against the numpy path: every decision equal."""
    report = _bench("gpu_dedup.py", [
        "--n", "3000", "--d", "32", "--n-clusters", "6", "--n-dups", "60", "--n-iter", "5",
        "--sample-size", "1500", "--device", "cpu", "--kmeans-backend", "torch",
        "--out", str(tmp_path / "dedup.json")], tmp_path)
    assert report["kmeans_cpu"] == "faiss/cpu" and report["kmeans_gpu"] == "torch/cpu"
    assert report["decisions_equal"] is True
    assert set(report["same_centroids_differences"].values()) == {0, True}
    assert report["cpu"]["n_duplicates"] == report["gpu_same_centroids"]["n_duplicates"] > 0
    assert report["cpu"]["planted_recall"] > 0.9 and report["gpu"]["planted_recall"] > 0.9
    # each speed-up is the two runs' own timings divided (the report rounds them to 10 ms)
    ratios = report["speedup_cpu_over_gpu"]
    assert set(ratios) >= {"kmeans_s", "assign_s", "pairwise_s", "total_s"}
    for stage, ratio in ratios.items():
        cpu, gpu = report["cpu"][stage], report["gpu"][stage]
        if gpu >= 0.02:   # within what the rounding of both timings allows
            assert (cpu - 0.005) / (gpu + 0.005) - 0.005 <= ratio <= \
                (cpu + 0.005) / (gpu - 0.005) + 0.005, stage
    assert report["gpu"]["total_s"] >= 0.02


def test_py_spy_stacks_summed_by_stage():
    from bench.gpu_monitor import summarise_stacks

    raw = "\n".join([
        'process 1:"python w";process_bundle (apache_beam/x.py:1);process (decode.py:9);'
        'open_rgb (beam_curator/transforms/decode.py:3);load (PIL/ImageFile.py:2) 6',
        'process 2:"python w";run_inference (embed.py:1);embed_images (embed.py:2);'
        'stage_pixels (embed.py:3);stack (torch:1) 3',
        'process 2:"python w";encode (apache_beam/coders/coders.py:1) 1'])
    summary = summarise_stacks(raw)
    assert summary["samples"] == 10 and summary["processes"] == 2
    assert summary["samples_per_process"] == [6, 4]
    assert summary["by_stage_pct"] == {"decode (Pillow)": 60.0,
                                       "host staging (stage_pixels)": 30.0,
                                       "Beam runtime (coders, bundles, gRPC)": 10.0}
    assert summary["top_functions"][0] == ("load (PIL/ImageFile.py:2)", 60.0)


def test_vit_l_14_flops_match_the_published_count():
    sys.path.insert(0, str(REPO))
    from bench.gpu_embed import peak_tflops, vision_gflops

    # open_clip's ViT-L-14.json (what init_random(arch="ViT-L-14") writes), image tower only.
    vit_l_14 = {"embed_dim": 768,
                "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14}}
    gflops = vision_gflops(vit_l_14)
    assert gflops == pytest.approx(162.025537536, abs=1e-9)   # integer arithmetic / 1e9
    assert round(989.4e3 / gflops) == 6106                     # images/s on an H100 at peak
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA L4") == 121.0 and peak_tflops("mystery") is None
    assert peak_tflops("NVIDIA GH200 480GB") == 989.4
