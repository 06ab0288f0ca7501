"""The one atomic writer: every file the project writes appears complete or not at all.

A file is written under a temp name beside its final path and renamed into place, through
Beam's FileSystems (local, gs://, s3://). No package imports: every layer uses it.
"""
from __future__ import annotations

import errno
import json
import os
import re
import uuid
from typing import Callable

from apache_beam.io.filesystems import FileSystems

TMP_PREFIX = ".tmp-"
_TMP_TOKEN_HEX = 12
# What `write_atomically` names a temp file: the sweep of a failed run deletes these names
# only (a user's `.tmp-draft.txt` does not match), and only where this run writes.
_TMP_NAME = re.compile(r"\.tmp-[0-9a-f]{%d}-(.+)" % _TMP_TOKEN_HEX, re.DOTALL)


def temp_target(name: str):
    """The final file name a temp name of `write_atomically` stands for, else None."""
    match = _TMP_NAME.fullmatch(name)
    return match.group(1) if match else None


def write_atomically(path: str, write: Callable[[object], None],
                     mime_type: str = "application/octet-stream", *,
                     pass_path: bool = False) -> str:
    """Write through `write(stream)` to a temp name beside `path`, then rename into place.

    The temp name is unique per attempt (`.tmp-<random>-<name>`): a retried or speculative
    bundle writing the same file never shares a temp file with another attempt. A failed
    attempt deletes its temp file; whatever a killed worker leaves is removed by the next
    run's claim on the output and before summary.json is written. `pass_path`: `write` gets
    the local temp path instead of a stream (writers that need a path: safetensors, a
    download checked by its hash); local paths only.
    """
    directory, name = path.rsplit("/", 1) if "/" in path else ("", path)
    tmp_name = f"{TMP_PREFIX}{uuid.uuid4().hex[:_TMP_TOKEN_HEX]}-{name}"
    tmp = FileSystems.join(directory, tmp_name) if directory else tmp_name
    if directory:
        _mkdirs(directory)
    try:
        if pass_path:
            if "://" in tmp and not tmp.startswith("file://"):
                raise ValueError(f"pass_path needs a local path, got {path}")
            write(tmp[7:] if tmp.startswith("file://") else tmp)
        else:
            with FileSystems.create(tmp, mime_type=mime_type) as stream:
                write(stream)
        if _is_local(path):
            # rename(2) replaces a file (or a link, never its target) atomically, and fails
            # on a directory: nothing of that name is ever deleted first.
            os.rename(_local(tmp), _local(path))
        else:
            if FileSystems.exists(path):
                FileSystems.delete([path])
            FileSystems.rename([tmp], [path])
    except BaseException as exc:
        try:
            if FileSystems.exists(tmp):
                FileSystems.delete([tmp])
        except Exception:   # noqa: BLE001 - the original error is the one to report
            pass
        if _is_disk_full(exc):
            # Name the file: through Beam's wrapping the message is all that reaches the
            # user, and pyarrow's own message does not say which file it was writing.
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path) from exc
        raise
    return path


def _is_local(path: str) -> bool:
    return path.startswith("file://") or "://" not in path


def _local(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def _is_disk_full(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "[Errno 28]" in str(exc) or "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _mkdirs(directory: str) -> None:
    """mkdir -p that tolerates another worker creating the same directory at the same time."""
    if FileSystems.exists(directory):
        return
    try:
        FileSystems.mkdirs(directory)
    except IOError:
        if not FileSystems.exists(directory):
            raise


def write_json(path: str, payload: dict) -> str:
    data = (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode("utf-8")
    return write_atomically(path, lambda stream: stream.write(data))
