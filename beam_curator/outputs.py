"""The output layout (README documents it; tests and users rely on it) and output hygiene.

OUTPUT/curated/*.tar, samples/*.parquet, embeddings/*.parquet, errors/*.parquet,
rejected/*.parquet (embed), dedup/..., summary.json, report.html: every writer writes one
file per shard (or per cluster / chunk), never one file of the whole run.
"""
from __future__ import annotations

from typing import List

from apache_beam.io.filesystems import FileSystems

from beam_curator.atomic import TMP_PREFIX
from beam_curator.errors import OptionError
from beam_curator.options import CuratorOptions

SUMMARY = "summary.json"
FAILED_SUMMARY = "summary.FAILED.json"
REPORT = "report.html"
SUBDIRS = ("curated", "samples", "embeddings", "errors", "rejected", "dedup")
TOP_LEVEL_FILES = (SUMMARY, FAILED_SUMMARY, REPORT)
# The run record and lock of --output (beam_curator.ownership).
LOCK_NAME = ".beam-curator.lock"
# Files this project writes beside its outputs: never read as input, wherever they are.
OWN_FILE_NAMES = TOP_LEVEL_FILES + (LOCK_NAME,)
# Options that do not change what a run writes: a rerun may differ in them.
_NOT_RECORDED = ("progress_interval", "overwrite", "verify_weights")


def curated_dir(out: str) -> str:
    return FileSystems.join(out, "curated")


def samples_dir(out: str) -> str:
    return FileSystems.join(out, "samples")


def embeddings_dir(out: str) -> str:
    return FileSystems.join(out, "embeddings")


def errors_dir(out: str) -> str:
    return FileSystems.join(out, "errors")


def rejected_dir(out: str) -> str:
    return FileSystems.join(out, "rejected")


def dedup_dir(out: str) -> str:
    return FileSystems.join(out, "dedup")


def summary_file(out: str) -> str:
    return FileSystems.join(out, SUMMARY)


def report_file(out: str) -> str:
    return FileSystems.join(out, REPORT)


def failed_summary_file(out: str) -> str:
    return FileSystems.join(out, FAILED_SUMMARY)


def recorded_options(opts: CuratorOptions) -> dict:
    """The options that decide a run's outputs, as written into summary.json."""
    values = opts.get_all_options(retain_unknown_options=False)
    names = sorted(a.dest for a in _curator_actions())
    return {n: values.get(n) for n in names if n not in _NOT_RECORDED}


def _curator_actions():
    import argparse

    parser = argparse.ArgumentParser()
    CuratorOptions._add_argparse_args(parser)
    return [a for a in parser._actions if a.dest != "help"]


def remove_temp_files(out: str) -> List[str]:
    """Delete `.tmp-*` files and the dedup staging directory a crashed run left behind;
    returns what was removed."""
    if not FileSystems.exists(out):
        return []
    matches = FileSystems.match([FileSystems.join(out, "**")])[0].metadata_list
    stale = [m.path for m in matches if m.path.rsplit("/", 1)[-1].startswith(TMP_PREFIX)
             and "/_staging/" not in m.path]
    if stale:
        FileSystems.delete(stale)
    staging = FileSystems.join(out, "dedup", "_staging")
    if FileSystems.exists(staging):
        FileSystems.delete([staging])
        stale.append(staging)
    return stale


def check_removal_dirs(globs: List[str]) -> None:
    for pattern in globs:
        if not FileSystems.match([pattern])[0].metadata_list:
            raise OptionError(
                f"--removal_ids: no parquet file matches {pattern}. Point it at a directory "
                "of parquet files with an `id` column, e.g. OUTPUT/dedup/duplicates (and "
                "OUTPUT/rejected from `embed`), comma-separated.")


def remove_summary(counts, options: dict) -> dict:
    """summary.json of the `remove` step, from RemoveCounts of every shard that is an input
    or is named by a removal id."""
    listed = sum(c.listed for c in counts)
    matched = sum(c.matched for c in counts)
    examples = sorted(i for c in counts for i in c.unmatched)[:20]
    summary = {
        "command": "remove",
        "options": options,
        "curated_samples_written": sum(c.written for c in counts),
        "curated_shards_written": sum(1 for c in counts if c.written),
        "per_shard_written": {c.shard: c.written for c in sorted(counts) if c.in_input},
        "removal_ids": {"listed": listed, "matched": matched, "unmatched": listed - matched,
                        "unmatched_examples": examples},
        "warnings": [],
    }
    if listed and (listed - matched) * 2 > listed:
        summary["warnings"].append(
            f"{listed - matched:,} of {listed:,} removal ids match no sample of --input "
            f"(e.g. {examples[:3]}): nothing was removed for them. Ids must be "
            "'<shard file name>/<webdataset key>', as this project writes them; positional "
            "ids (NeMo Curator's) or ids of other shards remove nothing.")
    return summary
