"""WriteBehind: a DoFn's file writes on one background thread, at most one in flight, every
error raised before the bundle commits."""
import threading

import pytest

from beam_curator.transforms.write_behind import WriteBehind


def test_submit_returns_while_the_write_runs_and_wait_waits_for_it():
    writes = WriteBehind()
    release, done = threading.Event(), []

    def slow_write(name):
        assert release.wait(10), "submit blocked on its own write"
        done.append(name)

    writes.submit(slow_write, "a")   # would deadlock if the write ran inline
    assert done == []
    release.set()
    writes.wait()
    assert done == ["a"]
    writes.close()


def test_submit_blocks_while_a_write_is_in_flight():
    """At most one write pending (what bounds memory to one extra element): a second submit
    returns only once the first write has finished, not as soon as it is queued."""
    writes, release, log = WriteBehind(), threading.Event(), []

    def first():
        assert release.wait(10)
        log.append("first done")

    writes.submit(first)
    second = threading.Thread(target=writes.submit, args=(log.append, "second"))
    second.start()
    second.join(0.3)
    assert second.is_alive(), "submit queued the write instead of waiting for the first"
    release.set()
    second.join(10)
    assert not second.is_alive()
    writes.wait()
    writes.close()
    assert log == ["first done", "second"]


def test_a_failed_write_fails_the_next_submit_or_the_wait():
    def fail(message):
        raise OSError(message)

    writes = WriteBehind()
    writes.submit(fail, "first")
    with pytest.raises(OSError, match="first"):
        writes.submit(lambda: None)
    writes.submit(fail, "second")
    with pytest.raises(OSError, match="second"):
        writes.wait()
    writes.wait()   # an error is raised once
    writes.close()


def test_close_finishes_the_pending_write():
    writes, done = WriteBehind(), []
    writes.submit(lambda: (threading.Event().wait(0.05), done.append(1)))
    writes.close()
    assert done == [1]


def test_a_new_bundle_forgets_a_failed_bundle_s_write():
    """A write still pending at start_bundle belongs to a bundle that failed (a committed one
    waited for its writes): the new bundle waits for it but does not inherit its error."""
    def fail():
        raise OSError("the failed bundle's write")

    writes, done = WriteBehind(), []
    writes.submit(fail)
    writes.forget()
    writes.submit(done.append, 1)
    writes.wait()
    assert done == [1]
    writes.close()
