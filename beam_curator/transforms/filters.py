"""Threshold filters: one ParDo, tagged outputs `passed` and `filtered`.

Rules (documented in README): a sample is filtered_nsfw when nsfw_score >= --nsfw_threshold,
else filtered_aesthetic when aesthetic_score < --aesthetic_threshold, else filtered_clip_score
when its image-caption CLIP score is below --clip_score_threshold (or it has no caption to
score), else it passes. NSFW is checked first so that an unsafe image is always reported as
such. A threshold of None switches that filter off.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import apache_beam as beam
import numpy as np

from beam_curator.defaults import DEFAULT_AESTHETIC_THRESHOLD, DEFAULT_NSFW_THRESHOLD
from beam_curator.schema import (
    FILTERED_AESTHETIC,
    FILTERED_CLIP_SCORE,
    FILTERED_NSFW,
    SampleResult,
)

FILTERED = "filtered"

# --clip_score_keep_fraction: the threshold is exact (numpy's "lower" quantile of every score)
# up to EXACT_SCORES scores; above, Beam's ApproximateQuantiles with rank error below
# QUANTILE_EPSILON * N (Munro-Paterson; ~1.7M floats of state whatever N, up to 1e9 scores),
# read at a rank resolution of 1 / (QUANTILES - 1).
EXACT_SCORES = 100_000
QUANTILES = 10_001
QUANTILE_EPSILON = 1e-4


def filter_status(aesthetic: float, nsfw: float, aesthetic_threshold: Optional[float],
                  nsfw_threshold: Optional[float], clip_score: Optional[float] = None,
                  clip_score_threshold: Optional[float] = None) -> Optional[str]:
    """The filtered_* status of a sample, or None when it passes every filter."""
    if nsfw_threshold is not None and nsfw >= nsfw_threshold:
        return FILTERED_NSFW
    if aesthetic_threshold is not None and aesthetic < aesthetic_threshold:
        return FILTERED_AESTHETIC
    if clip_score_threshold is not None and (clip_score is None
                                             or clip_score < clip_score_threshold):
        return FILTERED_CLIP_SCORE
    return None


def _reason(status: Optional[str], info, clip_score_threshold) -> Optional[str]:
    if status != FILTERED_CLIP_SCORE:
        return None
    if info.clip_score is None:
        return "no caption to score (--clip_score_threshold needs one)"
    return f"clip_score {info.clip_score:.4f} < --clip_score_threshold {clip_score_threshold}"


class ThresholdFilterFn(beam.DoFn):
    def __init__(self, aesthetic_threshold, nsfw_threshold, clip_score_threshold=None):
        self._aesthetic = aesthetic_threshold
        self._nsfw = nsfw_threshold
        self._clip = clip_score_threshold
        self.passed = beam.metrics.Metrics.counter("curator", "passed_filters")
        self.filtered = beam.metrics.Metrics.counter("curator", "filtered")

    def process(self, element):
        info, _ = element
        status = filter_status(info.aesthetic_score, info.nsfw_score, self._aesthetic,
                               self._nsfw, info.clip_score, self._clip)
        if status is None:
            self.passed.inc()
            yield element
        else:
            self.filtered.inc()
            result = SampleResult(info=info, status=status,
                                  reason=_reason(status, info, self._clip))
            yield beam.pvalue.TaggedOutput(FILTERED, (result, element[1]))


class FilterResult(NamedTuple):
    """What `FilterByScores` returns.

    passed: (SampleInfo, embedding) of the samples that pass every filter.
    filtered: (SampleResult, embedding) with status filtered_nsfw, filtered_aesthetic or
        filtered_clip_score.
    """

    passed: beam.PCollection
    filtered: beam.PCollection


class FilterByScores(beam.PTransform):
    """Scored (SampleInfo, embedding) -> FilterResult by the LAION scores.

    A sample is filtered_nsfw when nsfw_score >= nsfw_threshold, else filtered_aesthetic when
    aesthetic_score < aesthetic_threshold, else filtered_clip_score when clip_score <
    clip_score_threshold or there is no score (NSFW first: an unsafe image is always reported
    as such); None switches a filter off.

    Args:
      aesthetic_threshold: keep when the aesthetic score (LAION's 1–10 scale) is >= this.
      nsfw_threshold: filter when the NSFW score (0–1) is >= this.
      clip_score_threshold: keep when the image-caption cosine is >= this (LAION-5B used
        0.28 with ViT-B/32, LAION-400M 0.3); needs EmbedImages(clip_score=True).

    Example::

        split = scored | FilterByScores(aesthetic_threshold=None, nsfw_threshold=0.5)
        split.passed | ...
    """

    def __init__(self, *, aesthetic_threshold: Optional[float] = DEFAULT_AESTHETIC_THRESHOLD,
                 nsfw_threshold: Optional[float] = DEFAULT_NSFW_THRESHOLD,
                 clip_score_threshold: Optional[float] = None):
        super().__init__()
        self._aesthetic = aesthetic_threshold
        self._nsfw = nsfw_threshold
        self._clip = clip_score_threshold

    def expand(self, scored):
        out = scored | "Thresholds" >> beam.ParDo(
            ThresholdFilterFn(self._aesthetic, self._nsfw, self._clip)).with_outputs(
                FILTERED, main="passed")
        return FilterResult(passed=out.passed, filtered=out[FILTERED])


def lower_quantile(sorted_scores: np.ndarray, q: float) -> float:
    """numpy's "lower" quantile: the score at rank floor(q * (n - 1))."""
    return float(sorted_scores[int(math.floor(q * (len(sorted_scores) - 1) + 1e-9))])


class KeepFractionThresholdFn(beam.CombineFn):
    """Scores -> the threshold that keeps the top `fraction` of them (None for no scores):
    the (1 - fraction) lower quantile. Exact up to EXACT_SCORES scores, then approximate
    with a bounded state (see QUANTILE_EPSILON). The accumulator is (count, the scores while
    there are at most EXACT_SCORES, else None, the sketch once there are more, else None)."""

    def __init__(self, fraction: float):
        self._fraction = fraction
        self._approx = None

    def _sketch_fn(self):
        from apache_beam.transforms.stats import ApproximateQuantilesCombineFn

        if self._approx is None:
            self._approx = ApproximateQuantilesCombineFn.create(
                num_quantiles=QUANTILES, epsilon=QUANTILE_EPSILON)
        return self._approx

    def _sketch_of(self, acc):
        count, scores, sketch = acc
        if sketch is not None:
            return sketch
        fn = self._sketch_fn()
        sketch = fn.create_accumulator()
        for score in scores:
            sketch = fn.add_input(sketch, score)
        return sketch

    def create_accumulator(self):
        return 0, [], None

    def add_input(self, acc, score):
        count, scores, sketch = acc
        if scores is not None:
            scores.append(float(score))
            if len(scores) <= EXACT_SCORES:
                return count + 1, scores, None
            return count + 1, None, self._sketch_of((count, scores, None))
        return count + 1, None, self._sketch_fn().add_input(sketch, float(score))

    def merge_accumulators(self, accs):
        accs = list(accs)
        count = sum(a[0] for a in accs)
        if count <= EXACT_SCORES and all(a[1] is not None for a in accs):
            return count, [s for a in accs for s in a[1]], None
        sketch = self._sketch_fn().merge_accumulators([self._sketch_of(a) for a in accs])
        return count, None, sketch

    def extract_output(self, acc):
        count, scores, sketch = acc
        q = 1.0 - self._fraction
        if scores is not None:
            threshold = (lower_quantile(np.sort(np.asarray(scores, dtype=np.float32)), q)
                         if scores else None)
            return {"threshold": threshold, "scored": count, "exact": True}
        quantiles = self._sketch_fn().extract_output(sketch)
        return {"threshold": float(quantiles[int(round(q * (QUANTILES - 1)))]),
                "scored": count, "exact": False}


class _JudgeByThresholdFn(beam.DoFn):
    def __init__(self, fraction: float):
        self._fraction = fraction

    def process(self, info, threshold: dict):
        t = threshold["threshold"]
        if info.clip_score is not None and t is not None and info.clip_score >= t:
            yield info
            return
        reason = ("no caption to score (--clip_score_keep_fraction needs one)"
                  if info.clip_score is None else
                  f"clip_score {info.clip_score:.4f} < {t:.4f}, the threshold that keeps the "
                  f"top {self._fraction:g} of the scored pool")
        yield beam.pvalue.TaggedOutput(FILTERED, SampleResult(
            info=info, status=FILTERED_CLIP_SCORE, reason=reason))


class KeepTopResult(NamedTuple):
    """What `KeepTopClipScore` returns.

    passed: SampleInfo scoring at least the threshold.
    filtered: SampleResult with status filtered_clip_score.
    threshold: one dict: keep_fraction, threshold (None: nothing scored), scored (how many
        scores the pool had), exact (whether the threshold is exact).
    """

    passed: beam.PCollection
    filtered: beam.PCollection
    threshold: beam.PCollection


class KeepTopClipScore(beam.PTransform):
    """SampleInfo candidates -> KeepTopResult: keep those whose CLIP score is in the top
    `fraction` of `pool`'s scores (DataComp's CLIP-score filter: the top 30 % of the pool).

    The threshold is a global combiner over the pool's scores (bounded state: exact up to
    EXACT_SCORES scores, then rank error below QUANTILE_EPSILON * N), a singleton side input
    of the judging step. The candidates are SampleInfo only (no embedding): what waits for
    the threshold is a few hundred bytes per sample; the vectors are already written.

    Args:
      fraction: the share to keep, in (0, 1].
      pool: the scores to take the threshold over (floats; None: unscored, left out).

    Example::

        scores = scored | beam.MapTuple(lambda info, _: info.clip_score)
        top = (split.passed | beam.MapTuple(lambda info, _: info)
               | KeepTopClipScore(0.3, pool=scores))
    """

    def __init__(self, fraction: float, *, pool: beam.PCollection):
        super().__init__()
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction {fraction} must be in (0, 1]")
        self._fraction = fraction
        self._pool = pool

    def expand(self, candidates):
        fraction = self._fraction
        threshold = (self._pool
                     | "Scored" >> beam.Filter(lambda score: score is not None)
                     | "Threshold" >> beam.CombineGlobally(KeepFractionThresholdFn(fraction))
                     | "WithFraction" >> beam.Map(lambda t: dict(t, keep_fraction=fraction)))
        out = candidates | "Judge" >> beam.ParDo(
            _JudgeByThresholdFn(fraction), beam.pvalue.AsSingleton(threshold)).with_outputs(
                FILTERED, main="passed")
        return KeepTopResult(passed=out.passed, filtered=out[FILTERED], threshold=threshold)
