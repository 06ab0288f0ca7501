"""summary.json and the accounting check: every sample read ends in exactly one status.

The check runs inside the pipeline, after every other output is written (the written paths
arrive as side inputs, which orders the steps), so summary.json marks a finished run and a
broken invariant fails the run loudly instead of shipping a dataset that lost samples.
"""
from __future__ import annotations

import collections
from typing import Dict, List, Optional

import apache_beam as beam

from beam_curator import outputs
from beam_curator.ownership import finish_output
from beam_curator.schema import STATUSES
from beam_curator.transforms.write import write_json


class AccountingError(RuntimeError):
    """Input samples and final statuses disagree: a bug, never silently accepted."""


def build_summary(samples_read: int, status_rows: List[tuple], shard_errors: List[dict],
                  extra: Dict) -> dict:
    """status_rows: (id, shard, status) of every final record."""
    per_status = collections.Counter(status for _, _, status in status_rows)
    per_shard: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for _, shard, status in status_rows:
        per_shard[shard][status] += 1
    ids = [i for i, _, _ in status_rows]
    duplicated_ids = sorted(i for i, n in collections.Counter(ids).items() if n > 1)
    total = sum(per_status.values())
    summary = {
        "samples_read": samples_read,
        "counts": {s: per_status.get(s, 0) for s in STATUSES},
        "total_statuses": total,
        "per_shard": {shard: {s: c[s] for s in STATUSES if c[s]}
                      for shard, c in sorted(per_shard.items())},
        "shard_errors": sorted(shard_errors, key=lambda e: (e["shard"], e.get("member") or "",
                                                            e["reason"])),
        "accounting": {
            "ok": total == samples_read and not duplicated_ids,
            "input": samples_read,
            "sum_of_statuses": total,
            "ids_with_several_statuses": duplicated_ids[:20],
        },
    }
    summary.update(extra)
    return summary


class WriteSummaryFn(beam.DoFn):
    def __init__(self, out: str, extra: dict, claim_token: Optional[str], report: bool):
        self._out = out
        self._extra = extra
        self._claim_token = claim_token
        self._report = report

    def process(self, _, samples_read, status_rows, shard_errors, curated_counts, *written):
        extra = dict(self._extra)
        if curated_counts is not None:
            extra["curated_samples_written"] = sum(n for _, n in curated_counts)
            extra["curated_shards_written"] = sum(1 for _, n in curated_counts if n)
        summary = build_summary(samples_read, status_rows, shard_errors, extra)
        if curated_counts is not None and extra["curated_samples_written"] != summary[
                "counts"].get("kept", 0):
            summary["accounting"]["ok"] = False
            summary["accounting"]["curated_mismatch"] = (
                f"{extra['curated_samples_written']} samples written to curated/ but "
                f"{summary['counts'].get('kept', 0)} kept")
        if not summary["accounting"]["ok"]:
            # Leave the evidence beside the output, but never as summary.json (a finished run).
            write_json(outputs.failed_summary_file(self._out), summary)
            raise AccountingError(
                f"accounting failed: {summary['accounting']} — see summary.FAILED.json")
        # Every other output is complete (side inputs): the report, then summary.json last.
        yield finish_output(self._out, summary, self._claim_token, report=self._report)


class WriteSummary(beam.PTransform):
    """results -> OUTPUT/summary.json: counts per status and shard + the accounting check.

    `written` are PCollections whose completion must come first (the other outputs); with
    `report`, report.html is written just before summary.json; `claim_token` names the run
    record (beam_curator.ownership) that is removed once summary.json is there.
    """

    def __init__(self, out: str, extra: dict, *, samples_read, shard_errors,
                 curated_counts=None, written=(), claim_token: Optional[str] = None,
                 report: bool = False):
        super().__init__()
        self._out = out
        self._extra = extra
        self._claim_token = claim_token
        self._report = report
        self._samples_read = samples_read
        self._shard_errors = shard_errors
        self._curated_counts = curated_counts
        self._written = list(written)

    def expand(self, results):
        samples_read, shard_errors = self._samples_read, self._shard_errors
        curated_counts, written = self._curated_counts, self._written
        status_rows = results | "StatusRows" >> beam.Map(lambda r: (r.id, r.info.shard, r.status))
        error_rows = shard_errors | "ShardErrorRows" >> beam.Map(lambda e: e.to_row())
        pipeline = results.pipeline
        side_written = [beam.pvalue.AsList(w) for w in written]
        curated = (beam.pvalue.AsList(curated_counts) if curated_counts is not None else None)
        return (pipeline
                | "Once" >> beam.Create([None])
                | "WriteSummaryJson" >> beam.ParDo(
                    WriteSummaryFn(self._out, self._extra, self._claim_token, self._report),
                    beam.pvalue.AsSingleton(samples_read),
                    beam.pvalue.AsList(status_rows),
                    beam.pvalue.AsList(error_rows),
                    curated,
                    *side_written))
