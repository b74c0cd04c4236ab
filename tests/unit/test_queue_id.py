"""Queue ids: alphabet, order by creation time, uniqueness across processes."""

import os
import time

import pytest

from pymta.core.queue_id import (
    MAX_LENGTH, MIN_LENGTH, new_queue_id, queue_id_time, time_prefix, valid_queue_id,
)


def test_alphabet_and_length():
    for unique in (None, 0, 1, 12345, 2**32 - 1, 2**63):
        qid = new_queue_id(unique)
        assert qid.isascii() and qid.isalnum(), qid
        assert MIN_LENGTH <= len(qid) <= MAX_LENGTH
        assert valid_queue_id(qid)


def test_time_round_trip():
    now = 1_700_000_000.123456
    qid = new_queue_id(42, now)
    assert queue_id_time(qid) == pytest.approx(now, abs=1e-6)
    assert abs(queue_id_time(new_queue_id()) - time.time()) < 5


def test_sorted_by_time_across_units():
    # Crossing digit boundaries of seconds and microseconds keeps the order.
    times = [0.0, 0.000001, 0.999999, 1.0, 61.5, 62.0, 3843.0, 3844.0,
             1_700_000_000.0, 1_700_000_000.5, 4_000_000_000.25, 50_000_000_000.0]
    ids = [new_queue_id(10**9 - i, t) for i, t in enumerate(times)]
    assert ids == sorted(ids)
    assert [time_prefix(t) for t in times] == sorted(time_prefix(t) for t in times)


def test_time_prefix_of_alternating_seconds():
    # The encoding of the seconds is kept from one call to the next: going
    # back and forth between seconds must never reuse the other one's.
    times = [1_700_000_000.25, 1_700_000_001.5, 1_700_000_000.75, 5.0, 1_700_000_001.0]
    for t in times + times[::-1]:
        assert queue_id_time(time_prefix(t) + "0" + "0000") == pytest.approx(t, abs=1e-6)


def test_many_quick_calls_are_unique_and_sorted():
    ids = [new_queue_id() for _ in range(50_000)]
    assert len(set(ids)) == len(ids)
    prefixes = [q[:10] for q in ids]
    assert prefixes == sorted(prefixes)


def test_unique_across_forked_processes(tmp_path):
    pids = []
    for n in range(4):
        pid = os.fork()
        if pid == 0:
            try:
                ids = [new_queue_id() for _ in range(5000)]
                (tmp_path / f"ids.{n}").write_text("\n".join(ids))
            finally:
                os._exit(0)
        pids.append(pid)
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    ids = []
    for n in range(4):
        ids += (tmp_path / f"ids.{n}").read_text().split("\n")
    assert len(ids) == 20000
    assert len(set(ids)) == len(ids)
    assert all(valid_queue_id(q) for q in ids)


@pytest.mark.parametrize("bad", [
    "", "abc", "../../etc/passwd", ".tmp.123.abc", "1xVFAA38Qq92v/DNgWD",
    "1xVFAA38Qq92v DNgWD", "1xVFAA38Qq92vDNgWD\n", "é" * 20, "1" * (MAX_LENGTH + 1),
    "1xVFAA38Qq92vDNg.WD", None, b"1xVFAA38Qq92vDNgWD",
])
def test_valid_queue_id_rejects_hostile_names(bad):
    assert not valid_queue_id(bad)


def test_queue_id_time_rejects_non_ids():
    with pytest.raises(ValueError):
        queue_id_time("../x")
