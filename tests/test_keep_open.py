"""The encoder keeps its memory open between calls, longer for a memory that is slow to open."""

import contextlib
import time
from types import SimpleNamespace

from app.encoder import KEEP_OPEN_COST_FACTOR, _KeepOpen


class _Store:
    def __init__(self, open_s: float):
        self.open_s, self.opened, self.closed = open_s, 0, 0

    @contextlib.contextmanager
    def hold(self, collection):
        time.sleep(self.open_s)
        self.opened += 1
        try:
            yield
        finally:
            self.closed += 1


def test_a_slow_memory_is_kept_open_ten_times_as_long_as_opening_took():
    store = _Store(open_s=0.1)
    keep = _KeepOpen(SimpleNamespace(store=store), idle=0.05)
    keep.use("c")
    assert keep.idle >= KEEP_OPEN_COST_FACTOR * 0.1 > 0.05
    time.sleep(0.3)  # longer than the base idle time, shorter than ten opens
    keep.use("c")
    assert store.opened == 1 and store.closed == 0
    deadline = time.monotonic() + 5
    while store.closed == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.closed == 1  # let go once idle for its longer time


def test_a_fast_memory_keeps_the_base_idle_time():
    store = _Store(open_s=0.0)
    keep = _KeepOpen(SimpleNamespace(store=store), idle=0.2)
    keep.use("c")
    assert keep.idle == 0.2
    keep.close()
    assert store.closed == 1
