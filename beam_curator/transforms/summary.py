"""summary.json and the accounting check: every sample read ends in exactly one status.

Everything is counted by combiners, so no process ever holds the samples: counts per
(shard, status) are O(shards), ids given more than one status are found by a keyed count
(the summary keeps how many and the first few), shard-level errors are counted and sampled.
The check runs after every other output is written (their completion arrives as side inputs,
which orders the steps), so summary.json marks a finished run and a broken invariant fails the
run loudly instead of shipping a dataset that lost samples.
"""
from __future__ import annotations

import collections
from typing import Dict, List, Optional, Tuple

import apache_beam as beam

from beam_curator import outputs
from beam_curator.atomic import write_json
from beam_curator.ownership import finish_output
from beam_curator.schema import STATUSES

# The summary lists at most this many offending ids / shard-level errors (all of them are
# in samples/ and errors/); the counts are always exact.
SAMPLE_LIMIT = 1000


class AccountingError(RuntimeError):
    """Input samples and final statuses disagree: a bug, never silently accepted."""


def build_summary(samples_read: int, shard_status_counts: List[Tuple[Tuple[str, str], int]],
                  repeated_ids: Tuple[int, List[str]], shard_errors: Tuple[int, List[dict]],
                  extra: Dict) -> dict:
    """shard_status_counts: ((shard, status), count); repeated_ids: (how many ids have more
    than one status, the smallest of them); shard_errors: (count, the first rows)."""
    per_status = collections.Counter()
    per_shard: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for (shard, status), n in shard_status_counts:
        per_status[status] += n
        per_shard[shard][status] += n
    n_repeated, repeated_sample = repeated_ids
    n_errors, error_sample = shard_errors
    total = sum(per_status.values())
    summary = {
        "samples_read": samples_read,
        "counts": {s: per_status.get(s, 0) for s in STATUSES},
        "total_statuses": total,
        "per_shard": {shard: {s: c[s] for s in STATUSES if c[s]}
                      for shard, c in sorted(per_shard.items())},
        "n_shard_errors": n_errors,
        "shard_errors": error_sample,
        "accounting": {
            "ok": total == samples_read and n_repeated == 0,
            "input": samples_read,
            "sum_of_statuses": total,
            "n_ids_with_several_statuses": n_repeated,
            "ids_with_several_statuses": repeated_sample[:20],
        },
    }
    summary.update(extra)
    return summary


def _error_key(row: dict) -> tuple:
    return (row["shard"], row.get("member") or "", row["reason"], row.get("id") or "")


class WriteSummaryFn(beam.DoFn):
    def __init__(self, out: str, extra: dict, claim_token: Optional[str], report: bool):
        self._out = out
        self._extra = extra
        self._claim_token = claim_token
        self._report = report

    def process(self, _, samples_read, status_counts, n_repeated, repeated_sample, n_errors,
                error_sample, curated, dedup_info, clip_info, text_info, *written):
        extra = dict(self._extra)
        if curated is not None:
            extra["curated_samples_written"], extra["curated_shards_written"] = curated
        if dedup_info is not None:
            extra["dedup"] = dedup_info
        if clip_info is not None:
            extra["clip_score"] = clip_info
        if text_info is not None:
            extra["text_embeddings"] = dict(text_info, written=True)
        summary = build_summary(samples_read, status_counts, (n_repeated, repeated_sample),
                                (n_errors, [dict(zip(("shard", "member", "reason", "id"), e))
                                            for e in error_sample]), extra)
        for row in summary["shard_errors"]:   # the original nulls back
            row["member"] = row["member"] or None
            row["id"] = row["id"] or None
        kept = summary["counts"].get("kept", 0)
        if curated is not None and extra["curated_samples_written"] != kept:
            summary["accounting"]["ok"] = False
            summary["accounting"]["curated_mismatch"] = (
                f"{extra['curated_samples_written']} samples written to curated/ but "
                f"{kept} kept")
        if not summary["accounting"]["ok"]:
            # Leave the evidence beside the output, but never as summary.json (a finished run).
            write_json(outputs.failed_summary_file(self._out), summary)
            raise AccountingError(
                f"accounting failed: {summary['accounting']} — see summary.FAILED.json")
        # Every other output is complete (side inputs): the report, then summary.json last.
        if self._report:
            from beam_curator.report import write_report

            write_report(self._out, summary=summary)
        yield finish_output(self._out, summary, self._claim_token)


def sum_pairs(pairs) -> Tuple[int, int]:
    """A CombineGlobally function: element-wise sum of (a, b) pairs."""
    first, second = 0, 0
    for a, b in pairs:
        first, second = first + a, second + b
    return first, second


class WriteSummary(beam.PTransform):
    """results -> OUTPUT/summary.json: counts per status and shard + the accounting check.

    `written` are PCollections whose completion must come first (the other outputs); with
    `report`, report.html is written just before summary.json; `claim_token` names the run
    record (beam_curator.ownership) that is removed once summary.json is there;
    `curated_counts` are (shard, samples written); `dedup_info`, `clip_info` (the
    keep-fraction threshold) and `text_info` (what WriteTextEmbeddings wrote) one dict each
    for the summary.
    """

    def __init__(self, out: str, extra: dict, *, samples_read, shard_errors,
                 curated_counts=None, written=(), claim_token: Optional[str] = None,
                 report: bool = False, dedup_info=None, clip_info=None, text_info=None):
        super().__init__()
        self._out = out
        self._extra = extra
        self._claim_token = claim_token
        self._report = report
        self._samples_read = samples_read
        self._shard_errors = shard_errors
        self._curated_counts = curated_counts
        self._written = list(written)
        self._dedup_info = dedup_info
        self._clip_info = clip_info
        self._text_info = text_info

    def expand(self, results):
        status_counts = (results
                         | "ShardStatus" >> beam.Map(lambda r: ((r.info.shard, r.status), 1))
                         | "CountShardStatus" >> beam.CombinePerKey(sum))   # O(shards)
        repeated = (results
                    | "Ids" >> beam.Map(lambda r: (r.id, 1))
                    | "CountIds" >> beam.CombinePerKey(sum)
                    | "SeenTwice" >> beam.Filter(lambda kv: kv[1] > 1)
                    | "RepeatedIds" >> beam.Keys())
        errors = self._shard_errors | "ErrorKeys" >> beam.Map(lambda e: _error_key(e.to_row()))
        sides = [
            beam.pvalue.AsSingleton(self._samples_read),
            beam.pvalue.AsList(status_counts),
            _singleton(repeated | "CountRepeated" >> beam.combiners.Count.Globally()),
            _singleton(repeated | "SomeRepeated" >> beam.combiners.Top.Smallest(20)),
            _singleton(errors | "CountErrors" >> beam.combiners.Count.Globally()),
            _singleton(errors | "SomeErrors" >> beam.combiners.Top.Smallest(SAMPLE_LIMIT)),
        ]
        if self._curated_counts is not None:
            sides.append(_singleton(
                self._curated_counts
                | "CuratedPairs" >> beam.MapTuple(lambda _, n: (n, int(n > 0)))
                | "SumCurated" >> beam.CombineGlobally(sum_pairs)))
        else:
            sides.append(None)
        sides.append(beam.pvalue.AsSingleton(self._dedup_info)
                     if self._dedup_info is not None else None)
        sides.append(beam.pvalue.AsSingleton(self._clip_info)
                     if self._clip_info is not None else None)
        sides.append(beam.pvalue.AsSingleton(self._text_info)
                     if self._text_info is not None else None)
        sides += [_singleton(w | f"Done{i}" >> beam.combiners.Count.Globally())
                  for i, w in enumerate(self._written)]
        return (results.pipeline
                | "Once" >> beam.Create([None])
                | "WriteSummaryJson" >> beam.ParDo(
                    WriteSummaryFn(self._out, self._extra, self._claim_token, self._report),
                    *sides))


def _singleton(pcoll):
    return beam.pvalue.AsSingleton(pcoll)
