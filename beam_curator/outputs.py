"""The output layout (README documents it; tests and users rely on it) and output hygiene.

OUTPUT/curated/*.tar, samples/*.parquet, embeddings/*.parquet, errors/errors.parquet,
rejected/rejected.parquet (embed), dedup/..., summary.json, report.html.
"""
from __future__ import annotations

import json
from typing import List

from apache_beam.io.filesystems import FileSystems

from beam_curator.options import CuratorOptions, OptionError
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

    Called by every builder before it adds a transform; nothing is deleted before every check
    has passed (so a typo in --input never costs the previous output):

    * the inputs must exist (--input matches shards, --removal_ids / --embeddings match
      parquet files, --centroids exists) and must not lie inside the output directories this
      run replaces;
    * the same command with the same options into the same directory is a rerun: allowed; the
      previous outputs are deleted first, so the directory ends up holding exactly this run's
      files (the same bytes when the inputs did not change);
    * a directory holding a different finished run needs --overwrite;
    * summary.json (the mark of a finished run) is always removed up front, so a run that
      fails never leaves an output that looks complete. Temp files are removed too.
    """
    out = opts.output
    _check_inputs(opts, command)
    summary = summary_file(out)
    previous = _read_previous_summary(summary)
    if previous is not None:
        same = (previous.get("command") == command
                and previous.get("options") == recorded_options(opts))
        if not same and not opts.overwrite:
            raise OptionError(
                f"--output {out} already holds a different run "
                f"({previous.get('command') or 'unreadable summary.json'}, other options). "
                "Choose a new --output, or pass --overwrite true to replace it.")
    if previous is not None or opts.overwrite:
        _delete_run(out)
    for leftover in (summary, FileSystems.join(out, "summary.FAILED.json")):
        if FileSystems.exists(leftover):
            FileSystems.delete([leftover])
    remove_temp_files(out)


def _read_previous_summary(path: str):
    """The summary.json already in --output; {} (a run of unknown kind) when unreadable."""
    if not FileSystems.exists(path):
        return None
    try:
        previous = _read_json(path)
    except (ValueError, OSError):
        return {}
    return previous if isinstance(previous, dict) else {}


def _check_inputs(opts: CuratorOptions, command: str) -> None:
    """Fail fast, before anything in --output is touched, when an input is missing or lies
    inside the output directories a run replaces."""
    from beam_curator.transforms.read import match_globs, split_globs

    inputs = []   # (option, path or glob); the builders have matched --input already
    if command in ("run", "embed", "remove") and opts.input:
        inputs += [("--input", g) for g in split_globs(opts.input)]
    if command == "remove" and opts.removal_ids:
        dirs = split_globs(opts.removal_ids)
        check_removal_dirs([FileSystems.join(d, "*.parquet") for d in dirs])
        inputs += [("--removal_ids", d) for d in dirs]
    if command == "dedup" and opts.embeddings:
        if not match_globs(opts.embeddings):
            raise OptionError(
                f"--embeddings {opts.embeddings!r} matches no file. Point it at the embeddings "
                "parquet files, e.g. 'OUTPUT/embeddings/*.parquet' of an `embed` run.")
        inputs += [("--embeddings", g) for g in split_globs(opts.embeddings)]
    if command in ("run", "dedup") and opts.centroids:
        if not FileSystems.exists(opts.centroids):
            raise OptionError(
                f"--centroids {opts.centroids} does not exist. Point it at a centroids .npy "
                "(e.g. OUTPUT/dedup/centroids.npy of an earlier run), or leave it out to train "
                "them.")
        inputs.append(("--centroids", opts.centroids))
    if opts.model_dir and command in ("run", "embed"):
        inputs.append(("--model_dir", opts.model_dir))
    replaced = [FileSystems.join(opts.output, d) for d in SUBDIRS]
    for option, path in inputs:
        for directory in replaced:
            if _inside(path, directory):
                raise OptionError(
                    f"{option} {path} lies inside {directory}, which this run writes (and a "
                    "rerun replaces): write to another --output, or move the input out of it.")


def _inside(path: str, directory: str) -> bool:
    """Whether `path` (a file, a directory or a glob) is `directory` or below it."""
    import os

    def norm(p: str) -> str:
        p = p[len("file://"):] if p.startswith("file://") else p
        if "://" not in p:
            p = os.path.abspath(p)
        return p.rstrip("/")

    path, directory = norm(path), norm(directory)
    return path == directory or path.startswith(directory + "/")


def _delete_run(out: str) -> None:
    paths = [FileSystems.join(out, d) for d in SUBDIRS] + [report_file(out)]
    existing = [p for p in paths if FileSystems.exists(p)]
    if existing:
        FileSystems.delete(existing)


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


def write_remove_summary(out: str, shard_counts, options: dict) -> str:
    return write_json(summary_file(out), {
        "command": "remove",
        "options": options,
        "curated_samples_written": sum(n for _, n in shard_counts),
        "curated_shards_written": sum(1 for _, n in shard_counts if n),
        "per_shard_written": {s: n for s, n in sorted(shard_counts)},
    })
