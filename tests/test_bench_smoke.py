"""bench/gpu_embed.py in its tiny CPU mode: the GPU benchmark stays runnable where no GPU is."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_gpu_embed_bench_runs_on_cpu(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_embed.py"), "--device", "cpu", "--arch", "tiny",
         "--forward-sizes", "4,16", "--staging-images", "32", "--workdir", str(tmp_path / "work")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])     # the last line is the JSON
    handler = results["handler"]
    assert handler["device"] == "cpu" and handler["weights"] == "fp32"
    assert set(handler["batches"]) == {"8/4", "8/8", "16/4", "16/16"}   # batch/forward
    for row in handler["batches"].values():
        assert row["handler_images_per_s"] > 0 and row["model_images_per_s"] > 0
    pipeline = results["pipeline"]
    assert pipeline["images"] == 32 and pipeline["images_per_s"] > 0
    assert pipeline["embeddings_written"] == 32 - 1                 # one planted corrupt image
    assert pipeline["decode"]["images_per_s_per_core"] > 0
    assert results["kmeans"].get("cpu_s", 0) > 0 or "skipped" in results["kmeans"]
    staging = results["staging"]
    assert staging["pinned"] is False and staging["now_ms_per_1000"] > 0
    assert results["random_weights"] is True and results["gflop_per_image"] > 0
    assert results["summary"]["handler_meets_goal"] is None         # a goal for GPUs only


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
