"""The errors a user can fix. Their message names the fix; the CLI prints it and exits 2.

This module imports nothing of the package, so every layer (options, transforms, models,
report) can raise these without importing the layers above it.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
from typing import Optional


class OptionError(ValueError):
    """A bad option: the message names the fix."""


class ShardListError(ValueError):
    """--input matched nothing, or two shards share a name (ids would collide)."""


class DiskFullError(OSError):
    """The disk (or quota) ran out while the run wrote its outputs."""


def user_errors() -> tuple:
    """Every exception type whose message is for the user (no traceback)."""
    from beam_curator.models import ModelDirError  # the models layer defines its own

    return (OptionError, ShardListError, ModelDirError, FileExistsError, DiskFullError)


_ERRNO_28 = re.compile(r"\[Errno (?:28|122)\][^'\n]*?: '([^'\n]+)'")


def disk_full_error(exc: BaseException, output: str) -> Optional[DiskFullError]:
    """A one-line DiskFullError when `exc` (or what Beam wrapped it in) is ENOSPC / EDQUOT."""
    path, found = None, False
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            found, path = True, path or seen.filename
        text = str(seen)
        match = _ERRNO_28.search(text)
        if match:
            found, path = True, path or match.group(1)
        found = found or "No space left on device" in text
        seen = seen.__cause__ or seen.__context__
    if not found:
        return None
    where = path or output
    free = ""
    try:
        local = where[7:] if where.startswith("file://") else where
        if "://" not in local:
            probe = local
            while probe and not os.path.exists(probe):
                probe = os.path.dirname(probe)
            free = f" ({shutil.disk_usage(probe or '.').free / 2**20:,.0f} MiB free there now)"
    except OSError:
        pass
    return DiskFullError(
        errno.ENOSPC,
        f"no space left on device while writing {where}{free}. Free some space or choose an "
        "--output on a larger disk, then rerun the same command (it replaces this run's "
        "partial outputs; temp files and dedup/_staging were removed)")
