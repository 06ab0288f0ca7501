"""Threshold filters: one ParDo, tagged outputs `passed` and `filtered`.

Rules (documented in README): a sample is filtered_nsfw when nsfw_score >= --nsfw_threshold,
else filtered_aesthetic when aesthetic_score < --aesthetic_threshold, else filtered_clip_score
when its image-caption CLIP score is below --clip_score_threshold (or it has no caption to
score), else it passes. NSFW is checked first so that an unsafe image is always reported as
such. A threshold of None switches that filter off.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import apache_beam as beam

from beam_curator.defaults import DEFAULT_AESTHETIC_THRESHOLD, DEFAULT_NSFW_THRESHOLD
from beam_curator.schema import (
    FILTERED_AESTHETIC,
    FILTERED_CLIP_SCORE,
    FILTERED_NSFW,
    SampleResult,
)

FILTERED = "filtered"


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
