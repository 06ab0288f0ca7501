"""What a benchmark run kept busy: GPU and CPU utilisation sampled over time, and where the
Python processes spent their CPU (py-spy stacks summed by stage).

    with UtilisationSampler(interval_s=0.25) as sampler:
        run_the_pipeline()
    sampler.summary(threshold=5)   # the window in which the GPU worked, and how busy both were

GPU utilisation is NVML's (the share of time a kernel ran), read through `pynvml` or, failing
that, `nvidia-smi`; CPU utilisation is the busy share of all cores from /proc/stat. Neither
needs a package that the GPU machine lacks; where neither GPU reader works, GPU fields are None.
"""
from __future__ import annotations

import collections
import shutil
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from bench.sampling import BackgroundSampler


def _cpu_times() -> Optional[Tuple[int, int]]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat (Linux)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)     # idle + iowait
    return sum(values) - idle, sum(values)


def _gpu_reader():
    """A function returning (utilisation %, memory used MiB) of GPU 0, or None."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)

        def read_nvml():
            util = pynvml.nvmlDeviceGetUtilizationRates(handle)
            return float(util.gpu), pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20

        read_nvml()
        return read_nvml
    except Exception:   # noqa: BLE001 - no pynvml, no driver: try nvidia-smi
        pass
    if shutil.which("nvidia-smi") is None:
        return None

    def read_smi():
        out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                              "--format=csv,noheader,nounits", "--id=0"],
                             capture_output=True, text=True, timeout=5).stdout
        util, memory = out.strip().split(",")[:2]
        return float(util), float(memory)

    try:
        read_smi()
    except Exception:   # noqa: BLE001 - nvidia-smi there but no GPU answers
        return None
    return read_smi


class UtilisationSampler(BackgroundSampler):
    """Samples (seconds since start, GPU %, GPU MiB, CPU %) on a thread until stopped."""

    def __init__(self, interval_s: float = 0.25):
        self.interval_s = interval_s
        self.samples: List[Tuple[float, Optional[float], Optional[float], Optional[float]]] = []
        self._gpu = _gpu_reader()
        self.gpu_readable = self._gpu is not None
        super().__init__(name="utilisation")

    def _loop(self):
        start = time.perf_counter()
        last = _cpu_times()
        while not self._stop.wait(self.interval_s):
            now = _cpu_times()
            cpu = None
            if now and last and now[1] > last[1]:
                cpu = 100.0 * (now[0] - last[0]) / (now[1] - last[1])
            last = now
            gpu = memory = None
            if self._gpu is not None:
                try:
                    gpu, memory = self._gpu()
                except Exception:   # noqa: BLE001 - one failed read is a gap, not a failure
                    pass
            self.samples.append((time.perf_counter() - start, gpu, memory, cpu))

    def summary(self, threshold: float = 5.0) -> Dict:
        """The GPU's working window (first to last sample at >= threshold % utilisation) and
        the mean GPU and CPU utilisation inside it."""
        out: Dict = {"samples": len(self.samples), "interval_s": self.interval_s,
                     "gpu_readable": self.gpu_readable}
        cpu_all = [s[3] for s in self.samples if s[3] is not None]
        out["cpu_busy_mean_pct"] = round(sum(cpu_all) / len(cpu_all), 1) if cpu_all else None
        busy = [i for i, s in enumerate(self.samples) if s[1] is not None and s[1] >= threshold]
        if not busy:
            return out
        window = self.samples[busy[0]:busy[-1] + 1]
        gpu = [s[1] for s in window if s[1] is not None]
        cpu = [s[3] for s in window if s[3] is not None]
        memory = [s[2] for s in self.samples if s[2] is not None]
        out.update({
            "gpu_window_s": round(window[-1][0] - window[0][0] + self.interval_s, 2),
            "gpu_window_start_s": round(window[0][0], 2),
            "gpu_busy_mean_pct_in_window": round(sum(gpu) / len(gpu), 1),
            "cpu_busy_mean_pct_in_window": round(sum(cpu) / len(cpu), 1) if cpu else None,
            "gpu_memory_peak_mib": round(max(memory)) if memory else None})
        return out


# ---- py-spy: where the CPU time went ------------------------------------------------------

# (stage, markers): a sample belongs to the first stage one of whose markers is in its stack.
STAGES = (
    ("host staging (stage_pixels)", ("stage_pixels",)),
    ("model: queue forwards + wait for the GPU", ("encode_pixels", "embed_images")),
    ("decode (Pillow)", ("open_rgb",)),
    ("resize + crop (preprocess)", ("to_pixels",)),
    ("read tar members", ("transforms/read.py",)),
    ("score heads", ("transforms/scores.py", "models/heads.py")),
    ("write parquet", ("transforms/write.py", "pyarrow")),
    ("Beam runtime (coders, bundles, gRPC)", ("apache_beam",)),
)


def summarise_stacks(raw: str, top: int = 25) -> Dict:
    """py-spy's raw output ('frame;frame;... count' lines) -> samples per stage and the
    functions most often on top of the stack."""
    per_stage: Dict[str, int] = collections.Counter()
    per_leaf: Dict[str, int] = collections.Counter()
    per_process: Dict[str, int] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        root = stack.split(";", 1)[0]     # 'process PID:"command"' with --subprocesses
        if root.startswith("process "):
            per_process[root.split(":", 1)[0]] += n
        stage = next((name for name, markers in STAGES if any(m in stack for m in markers)),
                     "other")
        per_stage[stage] += n
        per_leaf[stack.rsplit(";", 1)[-1]] += n
    return {"samples": total, "processes": len(per_process),
            "samples_per_process": sorted(per_process.values(), reverse=True),
            "by_stage_pct": {k: round(100.0 * v / total, 1) for k, v in per_stage.most_common()}
            if total else {},
            "top_functions": [(k, round(100.0 * v / total, 1))
                              for k, v in per_leaf.most_common(top)] if total else []}


def record_stacks(py_spy: str, pid: int, seconds: float, output: Path, rate: int = 50
                  ) -> Dict:
    """Run `py-spy record` on pid and its children for `seconds`; the summary, or an error."""
    cmd = [py_spy, "record", "--pid", str(pid), "--subprocesses", "--nonblocking",
           "--duration", str(int(max(1, seconds))), "--rate", str(rate), "--format", "raw",
           "--output", str(output)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"py-spy did not run: {exc}"}
    if proc.returncode != 0 or not output.exists():
        return {"error": f"py-spy exited {proc.returncode}: {proc.stderr.strip()[-500:]}"}
    return summarise_stacks(output.read_text())
