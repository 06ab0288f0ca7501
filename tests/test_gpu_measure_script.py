"""scripts/gpu_measure.sh --tiny on the CPU: the one command a lent GPU machine runs must not
meet a silly bug there first. Its Python parts are tested in test_bench_smoke.py; this runs the
shell glue end to end (steps, time limits, files under $OUT, summary, clean-up)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_measure_tiny_runs_every_step_and_cleans_up(tmp_path):
    out, work, site = tmp_path / "out", tmp_path / "work", tmp_path / "site"
    env = {**os.environ, "PY": sys.executable, "OUT": str(out), "WORK": str(work),
           "SITE": str(site), "WHEELS": str(tmp_path / "no-wheels"), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_measure.sh"), "--tiny"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    files = {p.name for p in out.iterdir()}
    assert files == {"env.txt", "tests.txt", "gpu_dedup.json", "gpu_embed.json",
                     "gpu_pipeline.json", "summary.txt", "log.txt"}    # no compile on CPU
    assert len(files) <= 8                       # what the device tool brings back
    summary = (out / "summary.txt").read_text()
    assert "failed steps: none" in summary and "decisions equal = True" in summary
    assert " passed" in (out / "tests.txt").read_text()
    dedup = json.loads((out / "gpu_dedup.json").read_text())
    assert dedup["decisions_equal"] is True
    pipeline = json.loads((out / "gpu_pipeline.json").read_text())["pipeline"]["configs"]
    assert set(pipeline) == {"in_process:1", "multi_processing:2:env.OMP_NUM_THREADS=1"}
    assert all(row["embedded"] == 96 for row in pipeline.values())
    assert not work.exists() and not site.exists()          # the script cleaned up
