"""The output layout (README documents it; tests and users rely on it) and output hygiene.

OUTPUT/curated/*.tar, samples/*.parquet, embeddings/*.parquet, errors/errors.parquet,
rejected/rejected.parquet (embed), dedup/..., summary.json, report.html.
"""
from __future__ import annotations

import json
from typing import List

from apache_beam.io.filesystems import FileSystems

from beam_curator.options import CuratorOptions, OptionError
from beam_curator.schema import EMBEDDINGS_SCHEMA, REJECTED_SCHEMA  # noqa: F401 (re-export)
from beam_curator.transforms.write import TMP_PREFIX, write_json

SUMMARY = "summary.json"
SUBDIRS = ("curated", "samples", "embeddings", "errors", "rejected", "dedup")
# Options that do not change what a run writes: a rerun may differ in them.
_NOT_RECORDED = ("progress_interval", "overwrite")


def curated_dir(out: str) -> str:
    return FileSystems.join(out, "curated")


def samples_dir(out: str) -> str:
    return FileSystems.join(out, "samples")


def embeddings_dir(out: str) -> str:
    return FileSystems.join(out, "embeddings")


def errors_file(out: str) -> str:
    return FileSystems.join(out, "errors", "errors.parquet")


def rejected_file(out: str) -> str:
    return FileSystems.join(out, "rejected", "rejected.parquet")


def dedup_dir(out: str) -> str:
    return FileSystems.join(out, "dedup")


def summary_file(out: str) -> str:
    return FileSystems.join(out, SUMMARY)


def report_file(out: str) -> str:
    return FileSystems.join(out, "report.html")


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


def _read_json(path: str):
    with FileSystems.open(path) as handle:
        return json.loads(handle.read().decode("utf-8"))


def prepare_output(opts: CuratorOptions, command: str) -> None:
    """Refuse to mix two different runs in one directory; clear what a rerun replaces.

    The same command into the same directory is a rerun: allowed, and it writes the same
    bytes. A directory holding a different run needs --overwrite. summary.json is removed up
    front so that a rerun that fails never leaves an output that looks complete.
    """
    out = opts.output
    summary = summary_file(out)
    if FileSystems.exists(summary):
        previous = _read_json(summary)
        same = (previous.get("command") == command
                and previous.get("options") == recorded_options(opts))
        if not same and not opts.overwrite:
            raise OptionError(
                f"--output {out} already holds a different run ({previous.get('command')}, other "
                "options). Choose a new --output, or pass --overwrite to replace it.")
        if not same:
            _delete_run(out)
    elif opts.overwrite:
        _delete_run(out)
    for leftover in (summary, FileSystems.join(out, "summary.FAILED.json")):
        if FileSystems.exists(leftover):
            FileSystems.delete([leftover])
    remove_temp_files(out)


def _delete_run(out: str) -> None:
    paths = [FileSystems.join(out, d) for d in SUBDIRS] + [report_file(out)]
    existing = [p for p in paths if FileSystems.exists(p)]
    if existing:
        FileSystems.delete(existing)


def remove_temp_files(out: str) -> List[str]:
    """Delete `.tmp-*` files a crashed run left behind; returns what was removed."""
    if not FileSystems.exists(out):
        return []
    matches = FileSystems.match([FileSystems.join(out, "**")])[0].metadata_list
    stale = [m.path for m in matches if m.path.rsplit("/", 1)[-1].startswith(TMP_PREFIX)
             or "/_staging" in m.path]
    if stale:
        FileSystems.delete(stale)
    return stale


def check_removal_dirs(globs: List[str]) -> None:
    for pattern in globs:
        if not FileSystems.match([pattern])[0].metadata_list:
            raise OptionError(
                f"--removal_ids: no parquet file matches {pattern}. Point it at a directory "
                "of parquet files with an `id` column, e.g. OUTPUT/dedup/duplicates (and "
                "OUTPUT/rejected from `embed`), comma-separated.")


def write_remove_summary(out: str, shard_counts, options: dict) -> str:
    return write_json(summary_file(out), {
        "command": "remove",
        "options": options,
        "curated_samples_written": sum(n for _, n in shard_counts),
        "curated_shards_written": sum(1 for _, n in shard_counts if n),
        "per_shard_written": {s: n for s, n in sorted(shard_counts)},
    })
