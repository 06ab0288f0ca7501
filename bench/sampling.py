"""A background sampler: `_loop` runs on a daemon thread for the length of a `with` block."""
from __future__ import annotations

import threading
from typing import Optional


class BackgroundSampler:
    """Subclasses write `_loop`, which runs until `_stop` is set (when the block ends)."""

    def __init__(self, name: Optional[str] = None):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def _loop(self):
        raise NotImplementedError

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False
