"""A run owns its output: inputs are never touched, one run at a time, never a mix of two runs.

`claim_output` is called by every pipeline builder before it adds a transform. In order:

1. every input path (shards, model dir, centroids, embeddings, removal ids) has already been
   resolved by the builder (globs expanded); here links are followed too, and an input that
   lies inside a path this run writes or deletes is refused. Nothing is touched yet;
2. the output directory is created, or refused with the fix when it cannot be written;
3. the output is locked: a local (or shared POSIX) output by `flock` on `LOCK_NAME`, which
   the kernel releases when the process dies, so a `kill -9` never leaves it locked; a remote
   output (gs://, s3://) by a lock record with a heartbeat that goes stale when its launcher
   dies. The lock file also records the run (command, options): an unfinished run is known
   by the record it leaves behind;
4. what the directory holds decides: a finished run (summary.json) or an unfinished one (a
   record) of the same command and options is replaced; anything else (another run, files of
   an unknown run) needs --overwrite. Then every path the run owns is deleted, so the
   directory ends up holding exactly this run's files.

The end of the run (`finish_output`, inside the pipeline) writes summary.json as the very
last file and then removes the run record; the launcher releases the lock.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
import threading
import time
import uuid
from typing import List, Optional, Sequence, Tuple

from apache_beam.io.filesystems import FileSystems

from beam_curator import outputs
from beam_curator.atomic import write_json
from beam_curator.errors import OptionError

_LOG = logging.getLogger(__name__)

LOCK_NAME = outputs.LOCK_NAME
# Remote locks: the launcher rewrites its record this often; a record older than STALE_S is
# the leftover of a launcher that died.
HEARTBEAT_S = 30.0
STALE_S = 300.0


class OutputBusyError(OptionError):
    """Another run is writing the same --output."""


# ---- paths ------------------------------------------------------------------------------

def is_local(path: str) -> bool:
    return path.startswith("file://") or "://" not in path


def _local(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def resolved(path: str) -> str:
    """Where a path really is: links followed for local paths; remote paths have no links."""
    if is_local(path):
        return os.path.realpath(os.path.abspath(_local(path)))
    return path.rstrip("/")


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def owned_paths(out: str) -> List[str]:
    """Every path a run into `out` writes or deletes (besides its lock and the temp files of
    its top-level files, see `check_inputs_outside_output`)."""
    return ([FileSystems.join(out, d) for d in outputs.SUBDIRS]
            + [FileSystems.join(out, name) for name in outputs.TOP_LEVEL_FILES])


def inside_owned_paths(path: str, out: str) -> bool:
    """Whether `path` lies in a path a run into `out` writes or deletes (links followed)."""
    forms = {resolved(path)} | ({os.path.abspath(_local(path))} if is_local(path) else set())
    owned = owned_paths(out) + [FileSystems.join(out, LOCK_NAME)]
    return any(_inside(f, d) for o in owned for d in {o.rstrip("/"), resolved(o)}
               for f in forms)


def check_inputs_outside_output(inputs: Sequence[Tuple[str, str]], out: str) -> None:
    """Refuse any input that lies inside a path this run writes or deletes.

    `inputs`: (option, path) with globs already expanded. Both sides are compared as they
    are written and with links followed (an input reached through a link into the output, or
    an output directory that is a link onto the input, is caught either way).
    """
    owned = owned_paths(out) + [FileSystems.join(out, LOCK_NAME)]
    owned_forms = [(o, {o.rstrip("/"), resolved(o)}) for o in owned]
    out_forms = {out.rstrip("/") or out, resolved(out)}
    for option, path in inputs:
        forms = {resolved(path)}
        if is_local(path):
            forms.add(os.path.abspath(_local(path)))
        for directory, directory_forms in owned_forms:
            if any(_inside(f, d) for f in forms for d in directory_forms):
                raise OptionError(
                    f"{option} {path} lies inside {directory}, which this run writes (and a "
                    "rerun or --overwrite deletes): write to another --output, or move the "
                    "input out of it.")
        for form in forms:
            parent, name = form.rsplit("/", 1) if "/" in form else ("", form)
            if parent in out_forms and outputs.is_own_top_level_temp(name):
                raise OptionError(
                    f"{option} {path} has the name of a temp file this run writes and "
                    f"deletes at the top of --output {out}: rename or move it.")


def _ensure_output_dir(out: str) -> None:
    """Create --output, or fail before any work with what is wrong and the fix."""
    if is_local(out):
        path = _local(out)
        if os.path.exists(path) and not os.path.isdir(path):
            raise OptionError(f"--output {out} is a file, not a directory: choose a directory "
                              "(it is created when missing).")
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise OptionError(f"--output {out} cannot be created ({exc.strerror or exc}): "
                              "choose a writable directory.") from None
        if not os.access(path, os.W_OK | os.X_OK):
            raise OptionError(f"--output {out} is not writable: choose a writable directory "
                              "or fix its permissions.")
        return
    try:
        FileSystems.mkdirs(out)
    except (IOError, OSError):
        pass   # object stores have no directories; the lock record below tests writing


def _check_owned_shapes(out: str) -> None:
    """Local outputs: what sits at a path the run owns must be what the run would have made
    there (a real directory, a regular file), never a link: the run writes into and deletes
    these paths, and a link would take the writes (or the deletes) somewhere else."""
    if not is_local(out):
        return   # object stores have no links and no directories
    for path in owned_paths(out):
        local = _local(path)
        try:
            mode = os.lstat(local).st_mode
        except FileNotFoundError:
            continue
        want_dir = path.rsplit("/", 1)[-1] in outputs.SUBDIRS
        if stat.S_ISLNK(mode):
            raise OptionError(
                f"{path} is a symbolic link (to {os.readlink(local)}): a run writes into "
                "and deletes this path, and never through a link. Remove the link, or point "
                "--output at the directory where you want the outputs.")
        if want_dir != stat.S_ISDIR(mode) or not (want_dir or stat.S_ISREG(mode)):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a directory"
            raise OptionError(
                f"{path} is {kind}, not what a run writes there: it is not this project's "
                "and a run would delete it. Move it away, or choose another --output.")


def _run_marker(directory: str) -> Optional[str]:
    """The file that shows `directory` is (or was) the output of a run: its lock record, or a
    summary.json that beam-curator wrote; None when there is neither."""
    lock = FileSystems.join(directory, LOCK_NAME)
    if (os.path.lexists(_local(lock)) if is_local(lock) else FileSystems.exists(lock)):
        return lock
    summary = outputs.summary_file(directory)
    return summary if _is_run_summary(summary) else None


def _is_run_summary(path: str) -> bool:
    try:
        if is_local(path) and not os.path.isfile(_local(path)):
            return False
        if not is_local(path) and not FileSystems.exists(path):
            return False
        with FileSystems.open(path) as handle:
            summary = json.loads(handle.read().decode("utf-8"))
    except (ValueError, OSError):
        return False
    return isinstance(summary, dict) and summary.get("command") in outputs.RUN_COMMANDS


def _parents(path: str) -> List[str]:
    """The directories above `path` (resolved for local paths; prefixes for remote ones)."""
    path = resolved(path)
    if is_local(path):
        parents = []
        while os.path.dirname(path) != path:
            path = os.path.dirname(path)
            parents.append(path)
        return parents
    scheme, rest = path.split("://", 1)
    parts = rest.split("/")
    return [f"{scheme}://" + "/".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def _run_markers_below(out: str) -> List[str]:
    """Run markers strictly below `out` (links are not followed)."""
    names = (LOCK_NAME, outputs.SUMMARY)
    if is_local(out):
        top = resolved(out)
        if not os.path.isdir(top):
            return []
        found = []
        for directory, _, files in os.walk(top):
            if directory == top:
                continue
            if LOCK_NAME in files or (outputs.SUMMARY in files and _is_run_summary(
                    os.path.join(directory, outputs.SUMMARY))):
                found.append(directory)
        return found
    if not FileSystems.exists(out):
        return []
    prefix = out.rstrip("/") + "/"
    matches = FileSystems.match([prefix + "**"])[0].metadata_list
    return sorted({m.path.rsplit("/", 1)[0] for m in matches
                   if m.path.rsplit("/", 1)[-1] in names and m.path.count("/") > prefix.count("/")
                   and (m.path.endswith(LOCK_NAME) or _is_run_summary(m.path))})


def check_not_nested(out: str) -> None:
    """Refuse an --output inside another run's output, or one that holds another run's
    output: the outer run deletes and rewrites its own subdirectories, and its rerun (or
    --overwrite) would take the inner run's files with them."""
    for parent in _parents(out):
        marker = _run_marker(parent)
        if marker:
            raise OptionError(
                f"--output {out} lies inside {parent}, the output of another run ({marker} is "
                f"there). A run there deletes and rewrites its subdirectories: choose an "
                f"--output outside {parent}.")
    inner = _run_markers_below(out)
    if inner:
        raise OptionError(
            f"--output {out} holds the output of another run ({inner[0]}"
            f"{f' and {len(inner) - 1} more' if len(inner) > 1 else ''}). A run here could "
            "delete it: choose another --output, or move that output out first.")


# ---- the run record and the lock ----------------------------------------------------------

def _record(command: str, options: dict, handed_to_job: bool) -> dict:
    return {"command": command, "options": options, "host": socket.gethostname(),
            "pid": os.getpid(), "started": time.time(), "heartbeat": time.time(),
            "token": uuid.uuid4().hex, "handed_to_job": handed_to_job}


def _describe(record: dict) -> str:
    if not _is_record(record):
        return "a run whose lock record cannot be read (it may be starting)"
    started = record.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    return (f"`{record.get('command', '?')}` started {when} by pid {record.get('pid', '?')} "
            f"on {record.get('host', '?')}")


def _is_record(record) -> bool:
    return isinstance(record, dict) and bool(record.get("token"))


def _parse(data: bytes) -> Optional[dict]:
    try:
        record = json.loads(data.decode("utf-8")) if data.strip() else None
    except ValueError:
        return {}
    return record if isinstance(record, dict) or record is None else {}


# The lock file is opened without following a link and never created through one; an
# existing one must be a regular file with no other name (a hard link to an input would be
# truncated by the record write).
_LOCK_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class _LocalLock:
    """flock on the lock file: held while this process lives, released by the kernel on death."""

    def __init__(self, out: str):
        self.path = os.path.join(_local(out), LOCK_NAME)
        self._fd: Optional[int] = None

    def _refuse(self, why: str) -> OptionError:
        return OptionError(
            f"{self.path} {why}: beam-curator writes its lock record there and never through "
            "a link or into a file it did not make. Remove it (it is not a run's record), "
            "then rerun.")

    def _open(self) -> Optional[int]:
        """The lock file's descriptor, created when missing; None if it vanished meanwhile."""
        try:
            return os.open(self.path, _LOCK_FLAGS | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pass
        except OSError as exc:
            raise OptionError(f"--output {os.path.dirname(self.path)} is not writable "
                              f"({exc.strerror or exc}): choose a writable directory.") from None
        try:
            fd = os.open(self.path, _LOCK_FLAGS)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise self._refuse(f"is a symbolic link (to {os.readlink(self.path)})"
                                   ) from None
            if exc.errno == errno.EISDIR:
                raise self._refuse("is a directory") from None
            raise OptionError(f"--output {os.path.dirname(self.path)} is not writable "
                              f"({exc.strerror or exc}): choose a writable directory.") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            os.close(fd)
            raise self._refuse("is not a regular file" if not stat.S_ISREG(info.st_mode)
                               else f"has {info.st_nlink - 1} other hard link(s)")
        return fd

    def acquire(self) -> Optional[dict]:
        """Lock; returns the record an earlier run left (None when none)."""
        import fcntl

        for _ in range(10):
            fd = self._open()
            if fd is None:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _parse(_read_fd(fd)) or {}
                os.close(fd)
                raise OutputBusyError(
                    f"another run is writing --output {os.path.dirname(self.path)} "
                    f"({_describe(holder)}). Wait for it to end, or choose another --output."
                ) from None
            # The file may have been removed (a run finishing) between open and flock: a
            # lock on a deleted file guards nothing, so lock the file that is there now.
            try:
                same = os.fstat(fd).st_ino == os.lstat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            data = _read_fd(fd)
            record = _parse(data)
            if data.strip() and not _is_record(record):
                os.close(fd)
                raise self._refuse(f"holds {len(data)} bytes that are not a run record")
            self._fd = fd
            return record
        raise OutputBusyError(f"could not lock {self.path}: it keeps being replaced")

    def write(self, record: dict) -> None:
        data = json.dumps(record, indent=2, sort_keys=True).encode("utf-8")
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
            os.fsync(self._fd)
        except OSError as exc:
            raise OptionError(
                f"--output {os.path.dirname(self.path)}: the run record {self.path} cannot be "
                f"written ({exc.strerror or exc}). Free some space (or fix the disk), or "
                "choose another --output.") from None

    update = write

    def release(self, delete_record: bool) -> None:
        if self._fd is None:
            return
        if delete_record:
            try:
                if os.fstat(self._fd).st_ino == os.lstat(self.path).st_ino:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
        os.close(self._fd)   # closing the descriptor drops the flock
        self._fd = None

    def __del__(self):
        if self._fd is not None:
            os.close(self._fd)


def _read_fd(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0) if size else b""


class _RemoteLock:
    """A lock record on an object store, kept fresh by a heartbeat thread.

    Object stores offer no atomic create through Beam's FileSystems, so two launchers that
    start within the same second could both write a record; each reads its record back
    after writing, and the one whose token is not there backs off. A launcher that dies stops
    the heartbeat, and after STALE_S its record no longer locks the output.
    """

    def __init__(self, out: str):
        self.path = FileSystems.join(out, LOCK_NAME)
        self._record: Optional[dict] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._writing = threading.Lock()   # the heartbeat and the launcher share the record

    def _read(self) -> Optional[dict]:
        if not FileSystems.exists(self.path):
            return None
        with FileSystems.open(self.path) as handle:
            return _parse(handle.read())

    def acquire(self) -> Optional[dict]:
        previous = self._read()
        if previous and not previous.get("handed_to_job") and (
                time.time() - float(previous.get("heartbeat") or 0) < STALE_S):
            raise OutputBusyError(
                f"another run is writing --output {self.path.rsplit('/', 1)[0]} "
                f"({_describe(previous)}; its last heartbeat is "
                f"{time.time() - float(previous.get('heartbeat') or 0):.0f} s old). Wait for "
                "it to end, or choose another --output.")
        return previous

    def write(self, record: dict) -> None:

        try:
            write_json(self.path, record)
        except (IOError, OSError) as exc:
            raise OptionError(f"--output {self.path.rsplit('/', 1)[0]} cannot be written "
                              f"({exc}): choose a writable location.") from None
        time.sleep(1.0)   # let a racing launcher's write land, then see who won
        current = self._read() or {}
        if current.get("token") != record["token"]:
            raise OutputBusyError(f"another run claimed --output {self.path.rsplit('/', 1)[0]}"
                                  f" at the same moment ({_describe(current)}).")
        self._record = record
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="output-lock-heartbeat",
                                            daemon=True)
            self._thread.start()

    def update(self, record: dict) -> None:

        with self._writing:
            self._record = record
            write_json(self.path, record)

    def _beat(self) -> None:

        while not self._stop.wait(HEARTBEAT_S):
            with self._writing:
                if self._stop.is_set() or self._record is None:
                    return
                record = self._record = dict(self._record, heartbeat=time.time())
                try:
                    current = self._read() or {}
                    if current.get("token") != record["token"]:
                        return   # the run finished (record removed) or was overwritten
                    write_json(self.path, record)
                except Exception:   # noqa: BLE001 - a missed beat only ages the record
                    _LOG.warning("could not refresh the lock record %s", self.path,
                                 exc_info=True)

    def release(self, delete_record: bool) -> None:
        self._stop.set()
        with self._writing:
            if delete_record and self._record is not None:
                current = self._read() or {}
                if current.get("token") == self._record["token"]:
                    FileSystems.delete([self.path])
            self._record = None


def _open_lock(out: str):
    return _LocalLock(out) if is_local(out) else _RemoteLock(out)


# ---- the claim --------------------------------------------------------------------------

class OutputClaim:
    """This run's hold on --output; `release` when the pipeline has ended."""

    def __init__(self, output: str, record: dict, lock):
        self.output = output
        self.token = record["token"]
        self._record = record
        self._lock = lock

    def release(self, finished: bool) -> None:
        """finished: the run wrote summary.json. Otherwise its temp files and staging are
        removed and its record stays, so the next run knows what is unfinished here."""
        if not finished:
            try:
                outputs.remove_temp_files(self.output)
            except Exception:   # noqa: BLE001 - the run's own error is the one to report
                _LOG.warning("could not remove the temp files of %s", self.output, exc_info=True)
        self._lock.release(delete_record=finished)

    def mark_handed_to_job(self, handed: bool = True) -> None:
        """Before a launcher submits a job and returns (Dataflow): the record says the output
        is the job's until its summary.json; False undoes it when the submission failed."""
        self._record = dict(self._record, handed_to_job=handed)
        self._lock.update(self._record)

    def hand_to_job(self) -> None:
        """The job was submitted and runs on its own: stop holding the lock, keep the record."""
        self._lock.release(delete_record=False)


def _need_overwrite(out: str, what: str) -> OptionError:
    return OptionError(f"--output {out} already holds {what}. Choose a new --output, or pass "
                       "--overwrite true to replace it.")


def _read_summary(out: str):
    path = outputs.summary_file(out)
    if not FileSystems.exists(path):
        return None
    try:
        with FileSystems.open(path) as handle:
            summary = json.loads(handle.read().decode("utf-8"))
    except (ValueError, OSError):
        return {}
    return summary if isinstance(summary, dict) else {}


def _check_previous(out: str, command: str, options: dict, overwrite: bool,
                    record: Optional[dict]) -> None:
    """Refuse to replace anything but the same run, unless --overwrite."""
    if overwrite:
        return
    summary = _read_summary(out)

    def same(previous: dict) -> bool:
        return (previous.get("command") == command
                and _comparable(previous.get("options")) == _comparable(options))

    if summary is not None:
        if not same(summary):
            raise _need_overwrite(out, "a different run (" + (
                summary.get("command") or "unreadable summary.json") + ", other options)")
        return
    if record is not None:
        if record.get("handed_to_job"):
            raise _need_overwrite(out, f"the output of a job submitted by {_describe(record)}; "
                                       "it may still be running. If that job has ended "
                                       "without writing summary.json, its output is "
                                       "incomplete")
        if not same(record):
            raise _need_overwrite(out, f"an unfinished run ({_describe(record)}, other "
                                       "options) that ended before writing summary.json")
        return
    leftovers = [p for p in owned_paths(out) if FileSystems.exists(p)]
    if leftovers:
        raise _need_overwrite(out, f"files of an unknown run ({', '.join(leftovers[:3])}) "
                                   "and no summary.json")


def _comparable(options) -> Optional[dict]:
    """Recorded options with --output resolved: `d`, `d/` and `./d` are one output."""
    if not isinstance(options, dict) or not options.get("output"):
        return options
    return dict(options, output=resolved(options["output"]))


def _clear(out: str) -> None:
    if is_local(out):
        existing = [p for p in owned_paths(out) if os.path.lexists(_local(p))]
    else:
        existing = [p for p in owned_paths(out) if FileSystems.exists(p)]
    outputs.delete_owned(existing)
    outputs.remove_temp_files(out)


def claim_output(opts, command: str, inputs: Sequence[Tuple[str, str]], *,
                 handed_to_job: bool = False) -> OutputClaim:
    """Check inputs against the output, lock it, refuse or clear what it holds; see the
    module docstring. `handed_to_job`: the launcher submits the job and returns."""
    out = opts.output
    check_inputs_outside_output(inputs, out)
    check_not_nested(out)
    _ensure_output_dir(out)
    _check_owned_shapes(out)
    recorded = outputs.recorded_options(opts)
    lock = _open_lock(out)
    previous = lock.acquire()
    try:
        _check_previous(out, command, recorded, opts.overwrite, previous)
        record = _record(command, recorded, handed_to_job)
        lock.write(record)
        _clear(out)
    except BaseException:
        lock.release(delete_record=False)
        raise
    return OutputClaim(out, record, lock)


class hold_output:   # noqa: N801 - used as a context manager, like open()
    """Lock an output for a short job (rewriting report.html) without recording a run."""

    def __init__(self, out: str):
        self._lock = _open_lock(out) if FileSystems.exists(out) else None

    def __enter__(self):
        if self._lock is None:   # nothing there: the caller reports what is missing
            return self
        record = self._lock.acquire()
        if record and record.get("handed_to_job"):
            raise OutputBusyError(f"--output {self._lock.path.rsplit('/', 1)[0]} belongs to a "
                                  f"job submitted by {_describe(record)} that has not "
                                  "finished.")
        return self

    def __exit__(self, *exc):
        if self._lock is not None:
            self._lock.release(delete_record=False)
        return False


def finish_output(out: str, summary: dict, token: Optional[str]) -> str:
    """The end of every run, inside the pipeline, once every other output is written: temp
    files gone, summary.json as the very last file, then the run record removed."""

    outputs.remove_temp_files(out)
    for warning in summary.get("warnings") or ():
        _LOG.warning("%s", warning)
    path = write_json(outputs.summary_file(out), summary)
    if token:
        _remove_record(out, token)
    return path


def _remove_record(out: str, token: str) -> None:
    path = FileSystems.join(out, LOCK_NAME)
    try:
        with FileSystems.open(path) as handle:
            record = _parse(handle.read()) or {}
    except (IOError, OSError):
        return
    if record.get("token") == token:
        # A local launcher still holds its flock on this file; it notices the file is gone.
        FileSystems.delete([path])


def inputs_of(option: str, paths: Sequence[str]) -> List[Tuple[str, str]]:
    return [(option, p) for p in paths]
