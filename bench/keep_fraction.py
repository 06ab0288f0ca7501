"""The keep-top-fraction threshold on N scores: its combiner in a Beam pipeline vs numpy.

The Beam side runs `KeepFractionThresholdFn` as `CombineGlobally` on the local runner over
N float scores (the same path as `run --clip_score_keep_fraction`); the plain side is
`numpy.quantile(scores, 1 - F, method="lower")` on the same array. Prints both times, the
ratio, the Beam side's peak traced memory, and how far the threshold's rank is from exact.

    python bench/keep_fraction.py [--n 1000000] [--fraction 0.3]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--fraction", type=float, default=0.3)
    parser.add_argument("--bundles", type=int, default=16)
    args = parser.parse_args()

    import apache_beam as beam

    from beam_curator.transforms.filters import KeepFractionThresholdFn

    scores = np.random.default_rng(0).normal(0.25, 0.05, args.n).astype(np.float32)
    parts = [p.tolist() for p in np.array_split(scores, args.bundles)]
    result = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
    tracemalloc.start()
    started = time.perf_counter()
    with beam.Pipeline(runner="FnApiRunner") as p:
        (p
         | beam.Create(parts)
         | beam.FlatMap(lambda part: part)
         | beam.CombineGlobally(KeepFractionThresholdFn(args.fraction))
         | beam.Map(lambda t: open(result, "w").write(json.dumps(t))))
    beam_s = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    started = time.perf_counter()
    exact = float(np.quantile(scores, 1 - args.fraction, method="lower"))
    numpy_s = time.perf_counter() - started
    with open(result) as handle:
        found = [json.load(handle)]
    os.unlink(result)
    threshold = found[0]["threshold"]
    rank = int((np.sort(scores) < threshold).sum())
    print(json.dumps({"benchmark": "keep_fraction", "n": args.n, "fraction": args.fraction,
                      "beam_s": round(beam_s, 2), "numpy_s": round(numpy_s, 3),
                      "ratio": round(beam_s / numpy_s, 1),
                      "beam_peak_traced_mb": round(peak / 2**20, 1),
                      "scores_mb": round(scores.nbytes / 2**20, 1),
                      "exact": found[0]["exact"], "threshold": threshold,
                      "exact_threshold": exact,
                      "rank_error_fraction": abs(rank - (1 - args.fraction) * (args.n - 1))
                      / args.n}))


if __name__ == "__main__":
    main()
