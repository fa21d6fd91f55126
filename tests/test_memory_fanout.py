"""memory.fanout: executors return one result per shard, in shard order; threads really run in parallel."""
import random
import threading
import time

import pytest

from memory.fanout import SerialFanout, ThreadFanout


def test_serial_keeps_order_and_runs_in_the_caller_thread():
    ex = SerialFanout()
    seen = []
    assert ex.map(lambda s: (seen.append(threading.get_ident()), s * 2)[1], [3, 1, 2]) == [6, 2, 4]
    assert set(seen) == {threading.get_ident()}
    ex.close()


def test_threads_keep_shard_order_whatever_finishes_first():
    ex = ThreadFanout(4)
    try:
        def slow(s):
            time.sleep(random.uniform(0, 0.02))
            return s
        assert ex.map(slow, list(range(20))) == list(range(20))
        assert ex.map(slow, []) == []
    finally:
        ex.close()


def test_threads_run_shards_concurrently():
    ex = ThreadFanout(2)
    barrier = threading.Barrier(2, timeout=5)  # only passes when two shards run at the same time
    try:
        assert ex.map(lambda s: barrier.wait() is not None and s, ["a", "b"]) == ["a", "b"]
    finally:
        ex.close()


def test_a_shard_error_reaches_the_caller():
    ex = ThreadFanout(2)

    def fail(s):
        if s == 1:
            raise ValueError("shard 1 is corrupt")
        return s
    try:
        with pytest.raises(ValueError, match="shard 1 is corrupt"):
            ex.map(fail, [0, 1, 2])
    finally:
        ex.close()
