"""Write-behind for DoFns: a bundle's file writes run on one background thread, so a write
(the kernel's copy into the page cache and its writeback; an upload on gs:// or s3://)
overlaps the compute of the next element instead of following it.

The dedup graph stages every chunk's vectors twice (3 GB each at 1M rows of 768-d): writing
them inline left the second core idle while the first waited on the kernel (~5 s of the
sampling pass at 1M, measured with py-spy's wall-clock view).

Correctness rests on when the files are read: only after a shuffle (a GroupByKey, a side
input), i.e. after the writing bundle has committed, and `WriteBehind.wait` runs in
`finish_bundle`, before that commit. A write that fails fails its bundle there, and the
retried bundle writes again (every write is atomic: see `beam_curator.atomic`).
"""
from __future__ import annotations

import concurrent.futures
from typing import Callable, Optional

import apache_beam as beam


class WriteBehind:
    """At most one write in flight: `submit` first waits for the previous one, so memory
    holds at most one element's data beyond the element being computed.

    Create it in `DoFn.setup` (a thread does not pickle), call `forget` in `start_bundle`,
    `wait` in `finish_bundle` and `close` in `teardown`.
    """

    def __init__(self):
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._pending: Optional[concurrent.futures.Future] = None

    def submit(self, write: Callable, *args) -> None:
        """Run `write(*args)` in the background once the previous write has finished (its
        error, if any, is raised here)."""
        self.wait()
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="curator-write-behind")
        self._pending = self._pool.submit(write, *args)

    def wait(self) -> None:
        """Block until the pending write is done; re-raise its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def forget(self) -> None:
        """Finish the pending write without raising its error. A write still pending when a
        bundle starts belongs to an earlier bundle that failed (a committed one waited for
        its writes): that bundle is retried, and its error is not this bundle's."""
        pending, self._pending = self._pending, None
        if pending is not None:
            concurrent.futures.wait([pending])

    def close(self) -> None:
        """`forget`, then stop the thread."""
        self.forget()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class WriteBehindDoFn(beam.DoFn):
    """A DoFn whose file writes go through `self._writes` (a `WriteBehind`): each bundle
    starts clean and ends only once its writes are on disk."""

    def setup(self):
        self._writes = WriteBehind()

    def start_bundle(self):
        self._writes.forget()

    def finish_bundle(self):
        self._writes.wait()

    def teardown(self):
        self._writes.close()

