"""The attribute protocol's asyncio reader: one list per read, however the
bytes arrive, and every malformed or oversized list refused."""

import asyncio

import pytest

from pymta.core import ipc


def read_all(chunks, limit=1 << 20):
    """Feed `chunks` to a StreamReader, then read lists until EOF or an error."""
    async def main():
        reader = asyncio.StreamReader(limit=limit)
        for c in chunks:
            reader.feed_data(c)
        reader.feed_eof()
        out = []
        while True:
            attrs = await ipc.read_attrs(reader)
            if attrs is None:
                return out
            out.append(list(attrs))
    return asyncio.run(main())


def test_lists_back_to_back_and_split_anywhere():
    first = ipc.encode([("queue_id", "Q1"), ("rcpt", "a@x"), ("rcpt", "b\n%@x")])
    second = ipc.encode({"status": "ok"})
    wire = first + second
    want = [[("queue_id", "Q1"), ("rcpt", "a@x"), ("rcpt", "b\n%@x")], [("status", "ok")]]
    assert read_all([wire]) == want
    for cut in range(1, len(wire)):
        assert read_all([wire[:cut], wire[cut:]]) == want, cut


def test_list_longer_than_the_reader_limit_is_read_by_lines():
    pairs = [("rcpt", f"user{i}@example.org") for i in range(200)]
    wire = ipc.encode(pairs) + ipc.encode({"end": "1"})
    assert read_all([wire], limit=256) == [pairs, [("end", "1")]]


@pytest.mark.parametrize("wire, why", [
    (b"\n", "empty|truncated"),
    (b"\na=1\n\n", "empty attribute list"),
    (b"a=1\n", "truncated"),
    (b"a=1\nb=2", "truncated"),
    (b"no equals sign\n\n", "bad attribute line"),
    (b"a=1\nno equals sign\nb=2\n\n", "bad attribute line"),
    (b"n" * 65 + b"=1\n\n", "bad attribute line"),
    (b"a b=1\n\n", "bad attribute line"),
    (b"a=%41\n\n", "bad escape"),
    (b"a=\xff\n\n", "not UTF-8"),
    (b"a=" + b"x" * ipc.MAX_LINE + b"\n\n", "too long"),
])
def test_malformed_lists_are_refused(wire, why):
    with pytest.raises(ipc.ProtocolError, match=why):
        read_all([wire])


def test_clean_eof_and_no_empty_lists_written():
    assert read_all([]) == []
    with pytest.raises(ValueError):
        ipc.encode([])


def test_file_reader_follows_the_same_rules():
    import io
    f = io.BytesIO(ipc.encode({"status": "ok"}) + b"\n")
    assert list(ipc.read_attrs_sync(f)) == [("status", "ok")]
    with pytest.raises(ipc.ProtocolError, match="empty attribute list"):
        ipc.read_attrs_sync(f)
    assert ipc.read_attrs_sync(io.BytesIO(b"")) is None
