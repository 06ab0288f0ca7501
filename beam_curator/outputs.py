"""The output layout (README documents it; tests and users rely on it) and output hygiene.

OUTPUT/curated/*.tar, samples/*.parquet, embeddings/*.parquet, errors/*.parquet,
rejected/*.parquet (embed), text_embeddings/{text_emb,metadata}/ (--text_embeddings),
dedup/..., summary.json, report.html: every writer writes one file per shard (or per
cluster / chunk), never one file of the whole run.
"""
from __future__ import annotations

import os
import shutil
from typing import List

from apache_beam.io.filesystems import FileSystems

from beam_curator.atomic import TMP_PREFIX, temp_target
from beam_curator.errors import OptionError
from beam_curator.options import CuratorOptions

SUMMARY = "summary.json"
# The commands whose summary.json marks a directory as a run's output.
RUN_COMMANDS = ("run", "embed", "dedup", "remove")
FAILED_SUMMARY = "summary.FAILED.json"
REPORT = "report.html"
SUBDIRS = ("curated", "samples", "embeddings", "errors", "rejected", "dedup",
           "text_embeddings")
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


def text_embeddings_dir(out: str) -> str:
    """clip-retrieval's layout inside: text_emb/text_emb_<shard>.npy and
    metadata/metadata_<shard>.parquet (--text_embeddings)."""
    return FileSystems.join(out, "text_embeddings")


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
    """Delete what failed or killed attempts of this run left: temp files of the atomic
    writer inside the run's own subdirectories and, at the top of --output, temp files of
    the run's own top-level files; and dedup/_staging. Returns what was removed.

    Nothing else is ever matched: a user's `OUT/notes/.tmp-draft.txt` or `OUT/.tmp-x.parquet`
    is neither in a subdirectory the run owns nor a temp name of one of its files. Links
    are removed as links, never followed.
    """
    stale = [p for sub in SUBDIRS for p in _temp_files_under(FileSystems.join(out, sub))
             if "/_staging/" not in p]
    stale += top_level_temp_files(out)
    delete_owned(stale)
    staging = FileSystems.join(out, "dedup", "_staging")
    if _exists_or_link(staging):
        delete_owned([staging])
        stale.append(staging)
    return stale


def is_own_top_level_temp(name: str) -> bool:
    """A temp name of one of the files a run writes at the top of --output."""
    return temp_target(name) in OWN_FILE_NAMES


def top_level_temp_files(out: str) -> List[str]:
    if _is_local(out):
        try:
            names = os.listdir(_local(out))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [os.path.join(_local(out), n) for n in sorted(names)
                if is_own_top_level_temp(n)]
    matches = FileSystems.match([FileSystems.join(out, TMP_PREFIX + "*")])[0].metadata_list
    return [m.path for m in matches
            if "/" not in m.path[len(out.rstrip("/")) + 1:]
            and is_own_top_level_temp(m.path.rsplit("/", 1)[-1])]


def _temp_files_under(directory: str) -> List[str]:
    if _is_local(directory):
        top = _local(directory)
        if os.path.islink(top) or not os.path.isdir(top):
            return []   # never walk through a link: what it leads to is not this run's
        return [os.path.join(d, n) for d, _, names in os.walk(top)   # links not followed
                for n in names if temp_target(n) is not None]
    if not FileSystems.exists(directory):
        return []
    matches = FileSystems.match([FileSystems.join(directory, "**")])[0].metadata_list
    return [m.path for m in matches if temp_target(m.path.rsplit("/", 1)[-1]) is not None]


def delete_owned(paths: List[str]) -> None:
    """Delete paths the run owns. Local: a link is unlinked (its target stays), a directory
    removed with its contents (rmtree never follows links inside); remote: FileSystems."""
    remote = []
    for path in paths:
        if not _is_local(path):
            remote.append(path)
            continue
        local = _local(path)
        try:
            if os.path.isdir(local) and not os.path.islink(local):
                shutil.rmtree(local)
            else:
                os.unlink(local)
        except FileNotFoundError:
            pass
    if remote:
        FileSystems.delete(remote)


def _exists_or_link(path: str) -> bool:
    if _is_local(path):
        return os.path.lexists(_local(path))
    return FileSystems.exists(path)


def _is_local(path: str) -> bool:
    return path.startswith("file://") or "://" not in path


def _local(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


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
