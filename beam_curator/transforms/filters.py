"""Threshold filters: one ParDo, tagged outputs `kept` and `filtered`.

Rules (documented in README): a sample is filtered_nsfw when nsfw_score >= --nsfw_threshold,
else filtered_aesthetic when aesthetic_score < --aesthetic_threshold, else it passes. NSFW is
checked first so that an unsafe image is always reported as such. A threshold of None
switches that filter off.
"""
from __future__ import annotations

from typing import Optional

import apache_beam as beam

from beam_curator.schema import FILTERED_AESTHETIC, FILTERED_NSFW, SampleResult

FILTERED = "filtered"


def filter_status(aesthetic: float, nsfw: float, aesthetic_threshold: Optional[float],
                  nsfw_threshold: Optional[float]) -> Optional[str]:
    """The filtered_* status of a sample, or None when it passes both filters."""
    if nsfw_threshold is not None and nsfw >= nsfw_threshold:
        return FILTERED_NSFW
    if aesthetic_threshold is not None and aesthetic < aesthetic_threshold:
        return FILTERED_AESTHETIC
    return None


class ThresholdFilterFn(beam.DoFn):
    def __init__(self, aesthetic_threshold, nsfw_threshold):
        self._aesthetic = aesthetic_threshold
        self._nsfw = nsfw_threshold
        self.passed = beam.metrics.Metrics.counter("curator", "passed_filters")
        self.filtered = beam.metrics.Metrics.counter("curator", "filtered")

    def process(self, element):
        info, _ = element
        status = filter_status(info.aesthetic_score, info.nsfw_score, self._aesthetic, self._nsfw)
        if status is None:
            self.passed.inc()
            yield element
        else:
            self.filtered.inc()
            yield beam.pvalue.TaggedOutput(FILTERED, (SampleResult(info=info, status=status),
                                                      element[1]))


class ApplyThresholds(beam.PTransform):
    """(info, embedding) -> main: passed; `filtered`: (SampleResult, embedding)."""

    def __init__(self, aesthetic_threshold, nsfw_threshold):
        super().__init__()
        self._aesthetic = aesthetic_threshold
        self._nsfw = nsfw_threshold

    def expand(self, scored):
        return scored | "Thresholds" >> beam.ParDo(
            ThresholdFilterFn(self._aesthetic, self._nsfw)).with_outputs(FILTERED, main="kept")
