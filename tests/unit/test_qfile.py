"""Queue file format: round trips, in-place updates, damaged files, fuzzing."""

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pymta.core.qfile import (
    CONTENT_OFFSET, POST_ATTRS, STAGE_POST, STAGE_QUEUE, QueueFile, QueueFileError,
    QueueFileWriter, Recipient,
)
from pymta.core.queue_id import new_queue_id
from pymta.core.safeio import open_exclusive

MSG = b"From: a@example.org\nSubject: test\n\nline 1\nline 2\n"


def make_writer(directory, stage=STAGE_QUEUE, now=1_700_000_000.25):
    tmp = os.path.join(str(directory), ".tmp.writer")
    fd = open_exclusive(tmp, 0o600)
    qid = new_queue_id(os.fstat(fd).st_ino, now)
    return QueueFileWriter(fd, tmp, os.path.join(str(directory), qid), qid, now, stage)


def write_file(directory, sender="alice@example.org", rcpts=("bob@example.net",),
               content=MSG, attrs=None, stage=STAGE_QUEUE):
    w = make_writer(directory, stage)
    w.set_sender(sender)
    for r in rcpts:
        if isinstance(r, dict):
            w.add_recipient(**r)
        else:
            w.add_recipient(r)
    for k, v in (attrs or {}).items():
        w.set_attr(k, v)
    w.write_content(content)
    w.commit()
    return w.path, w.queue_id


def open_file(path, stage=STAGE_QUEUE, readonly=False, max_content=None):
    flags = os.O_RDONLY if readonly else os.O_RDWR
    return QueueFile.from_fd(os.open(path, flags), path, os.path.basename(path), stage,
                             readonly, max_content)


def parses_or_rejects(tmp_path, data, stage=STAGE_QUEUE):
    """Hostile bytes either parse or raise QueueFileError, nothing else."""
    try:
        parse_bytes(tmp_path, data, stage)
    except QueueFileError as e:
        assert str(e).startswith(str(tmp_path / "fuzzed") + ": ")


def parse_bytes(tmp_path, data, stage=STAGE_QUEUE):
    path = tmp_path / "fuzzed"
    path.write_bytes(data)
    f = open_file(str(path), stage, readonly=True)
    try:
        f.read_content()
        f.pending()
    finally:
        f.close()


# -- round trips -----------------------------------------------------------------

def test_round_trip(tmp_path):
    rcpts = [
        {"address": "bob@example.net", "orig": "Bob@Example.NET",
         "notify": "SUCCESS,DELAY", "orcpt": "rfc822;bob@example.net"},
        {"address": "carol@example.net"},
        {"address": "\"dan smith\"@example.net", "orig": "dan"},
    ]
    attrs = {"ret": "HDRS", "envid": "QQ314159", "client_name": "mx.example.org",
             "client_address": "192.0.2.1", "helo_name": "mx", "protocol": "ESMTP",
             "sasl_username": "", "rewrite_context": "remote", "log_ident": "x=y=z"}
    path, qid = write_file(tmp_path, rcpts=rcpts, attrs=attrs)
    assert os.path.basename(path) == qid
    assert sorted(os.listdir(tmp_path)) == [qid], "temporary file must be gone"
    assert os.stat(path).st_mode & 0o777 == 0o600
    with open_file(path) as f:
        assert f.queue_id == qid
        assert f.sender == "alice@example.org"
        assert f.arrival_time == pytest.approx(1_700_000_000.25)
        assert f.attrs == attrs
        assert f.recipients == [
            Recipient("bob@example.net", "Bob@Example.NET", "SUCCESS,DELAY",
                      "rfc822;bob@example.net", False, 0),
            Recipient("carol@example.net", None, None, None, False, 1),
            Recipient("\"dan smith\"@example.net", "dan", None, None, False, 2),
        ]
        assert f.content_size == len(MSG)
        assert f.read_content() == MSG
        assert b"".join(f.content_chunks(7)) == MSG
        assert f.warn_time == 0


def test_null_sender_unicode_and_empty_content(tmp_path):
    path, _ = write_file(tmp_path, sender="", rcpts=["jörg@bücher.example"], content=b"")
    with open_file(path) as f:
        assert f.sender == ""
        assert f.recipients[0].address == "jörg@bücher.example"
        assert f.read_content() == b""
        assert list(f.content_chunks()) == []


def test_small_message_is_one_write(tmp_path, monkeypatch):
    writes = []
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append(len(data)) or real_write(fd, data))
    write_file(tmp_path)
    assert len(writes) == 1


def test_large_content_is_streamed(tmp_path):
    chunk = b"x" * 999 + b"\n"
    w = make_writer(tmp_path)
    w.set_sender("a@b")
    for _ in range(1000):                       # about 1 MB, more than the spill size
        w.write_content(chunk)
    w.add_recipient("late@example.org")         # after the content: still fine
    w.set_attr("size", str(1000 * len(chunk)))
    w.commit()
    with open_file(w.path) as f:
        assert f.content_size == 1000 * len(chunk)
        assert f.read_content() == chunk * 1000
        assert f.recipients[0].address == "late@example.org"
        out = tmp_path / "copy"
        with open(out, "wb") as o:
            assert f.send_content(o.fileno()) == f.content_size
        assert out.read_bytes() == chunk * 1000


def test_opening_reads_no_content(tmp_path, monkeypatch):
    big = b"y" * (3 << 20)
    path, _ = write_file(tmp_path, content=big)
    read = []
    real_pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: read.append(n) or real_pread(fd, n, off))
    with open_file(path) as f:
        assert f.content_size == len(big)
    assert sum(read) < 1000


def test_preload_reads_a_small_file_once(tmp_path, monkeypatch):
    """A delivery agent's open (preload): one pread for the whole file, and
    the content comes from it; a file above PRELOAD_MAX is read as usual."""
    from pymta.core.qfile import PRELOAD_MAX
    path, qid = write_file(tmp_path)
    read = []
    real_pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: read.append(n) or real_pread(fd, n, off))
    with QueueFile.open_path(path, qid, readonly=True, preload=True) as f:
        assert f.read_content() == MSG
        assert b"".join(f.content_chunks(7)) == MSG
        assert f.sender == "alice@example.org"
    assert read == [os.path.getsize(path)]
    big = b"z" * (PRELOAD_MAX + 1)
    path, qid = write_file(tmp_path, content=big)
    read.clear()
    with QueueFile.open_path(path, qid, readonly=True, preload=True) as f:
        assert f.read_content() == big
    assert len(read) == 3 and max(read) == len(big)


# -- updates in place ------------------------------------------------------------

def test_mark_done_is_one_byte_in_place(tmp_path):
    path, _ = write_file(tmp_path, rcpts=["a@x", "b@x", "c@x"])
    before = open(path, "rb").read()
    ino = os.stat(path).st_ino
    with open_file(path) as f:
        f.mark_done(1)
        assert [r.address for r in f.pending()] == ["a@x", "c@x"]
    after = open(path, "rb").read()
    assert os.stat(path).st_ino == ino and len(after) == len(before)
    diff = [i for i in range(len(before)) if before[i] != after[i]]
    assert len(diff) == 1 and before[diff[0]:diff[0] + 1] == b"P" and after[diff[0]:diff[0] + 1] == b"D"
    with open_file(path) as f:
        assert [r.done for r in f.recipients] == [False, True, False]
        f.mark_done(0)
        f.mark_done(2)
    with open_file(path) as f:
        assert f.pending() == []
        for bad in (-1, 3):
            with pytest.raises(IndexError):
                f.mark_done(bad)
    assert open(path, "rb").read().count(b"\nRD") == 3


def test_mark_done_refused_read_only(tmp_path):
    path, _ = write_file(tmp_path)
    with open_file(path, readonly=True) as f:
        with pytest.raises(ValueError):
            f.mark_done(0)


def test_warn_time_in_place(tmp_path):
    w = make_writer(tmp_path)
    w.set_sender("a@b")
    w.add_recipient("c@d")
    w.set_warn_time(1_700_014_400)
    w.commit()
    size = os.path.getsize(w.path)
    with open_file(w.path) as f:
        assert f.warn_time == 1_700_014_400
        f.set_warn_time(0)
    assert os.path.getsize(w.path) == size
    with open_file(w.path) as f:
        assert f.warn_time == 0


def test_closed_file_refuses_use(tmp_path):
    path, _ = write_file(tmp_path)
    f = open_file(path)
    f.close()
    f.close()
    with pytest.raises(ValueError):
        f.read_content()


# -- the writer refuses what would corrupt the file --------------------------------

@pytest.mark.parametrize("call", [
    lambda w: w.set_sender("a@b\nRPevil@x"),
    lambda w: w.set_sender("a@b\r"),
    lambda w: w.add_recipient("a\0b@x"),
    lambda w: w.add_recipient(""),
    lambda w: w.add_recipient("a@b", orig="x\ny"),
    lambda w: w.set_attr("bad name", "v"),
    lambda w: w.set_attr("", "v"),
    lambda w: w.set_attr("ok", "multi\nline"),
    lambda w: w.set_sender("\udcff@x"),
])
def test_writer_rejects_bad_values(tmp_path, call):
    w = make_writer(tmp_path)
    with pytest.raises(ValueError):
        call(w)
    w.abort()


def test_commit_needs_sender_and_recipient(tmp_path):
    w = make_writer(tmp_path)
    w.add_recipient("a@b")
    with pytest.raises(ValueError):
        w.commit()
    assert os.listdir(tmp_path) == [], "failed commit removes the temporary file"
    w = make_writer(tmp_path)
    w.set_sender("a@b")
    with pytest.raises(ValueError):
        w.commit()
    assert os.listdir(tmp_path) == []


def test_context_manager_aborts(tmp_path):
    with pytest.raises(RuntimeError):
        with make_writer(tmp_path) as w:
            w.write_content(b"partial")
            raise RuntimeError("client went away")
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError):
        w.write_content(b"more")


def test_post_stage_whitelist_in_writer(tmp_path):
    w = make_writer(tmp_path, STAGE_POST)
    with pytest.raises(ValueError):
        w.set_attr("client_address", "10.0.0.1")
    with pytest.raises(ValueError):
        w.add_recipient("a@b", orig="c@d")
    with pytest.raises(ValueError):
        w.set_warn_time(5)
    w.set_attr("full_name", "A. User")
    w.add_recipient("a@b", notify="NEVER")
    w.set_sender("u@h")
    w.commit()
    with open_file(w.path, STAGE_POST, readonly=True) as f:
        assert f.attrs == {"full_name": "A. User"}
        assert f.recipients[0].notify == "NEVER"


def test_queue_records_refused_in_post_stage(tmp_path):
    # A full queue file has W, O and attributes a user may not set.
    path, _ = write_file(tmp_path, rcpts=[{"address": "a@b", "orig": "c@d"}])
    with pytest.raises(QueueFileError):
        open_file(path, STAGE_POST, readonly=True)
    other = tmp_path / "other"
    other.mkdir()
    path, _ = write_file(other, attrs={"client_address": "10.1.1.1"})
    raw = open(path, "rb").read().replace(b"W000000000000\n", b"")
    with pytest.raises(QueueFileError, match="not allowed"):
        parse_bytes(tmp_path, raw, STAGE_POST)
    assert sorted(POST_ATTRS) == sorted(set(POST_ATTRS))


def test_post_stage_content_limit(tmp_path):
    w = make_writer(tmp_path, STAGE_POST)
    w.set_sender("u@h")
    w.add_recipient("a@b")
    w.write_content(b"z" * 5000)
    w.commit()
    with pytest.raises(QueueFileError, match="larger"):
        open_file(w.path, STAGE_POST, readonly=True, max_content=4096)


# -- damaged files ----------------------------------------------------------------

def test_every_truncation_is_detected(tmp_path):
    path, _ = write_file(tmp_path, rcpts=["a@x", {"address": "b@x", "orig": "B@x"}],
                         attrs={"ret": "FULL"})
    data = open(path, "rb").read()
    for n in range(len(data)):
        with pytest.raises(QueueFileError):
            parse_bytes(tmp_path, data[:n])
    parse_bytes(tmp_path, data)


@pytest.mark.parametrize("old,new", [
    (b"HPYMTA1", b"HPYMTA2"),                      # unknown version
    (b" 0000000000000", b" 0000000000001"),        # content size off
    (b"\nRPa@x", b"\nRXa@x"),                      # bad status byte
    (b"\nRPa@x", b"\nRP"),                         # empty recipient
    (b"\nSalice", b"\nZalice"),                    # unknown record type
    (b"\nSalice@example.org\n", b"\nSalice@example.org\nSsecond@x\n"),
    (b"\nT1700000000.250000", b"\nTsoon"),
    (b"\nT1700000000.250000\n", b"\nT1\nT2\n"),
    (b"\nW000000000000", b"\nW12"),
    (b"\nAret=FULL", b"\nAret"),
    (b"\nAret=FULL", b"\nAr t=FULL"),
    (b"\nAret=FULL", b"\nAret=F\rULL"),
    (b"\nAret=FULL", b"\nAret=\xff\xfe"),
    (b"\nAret=FULL\n", b"\nAret=FULL\n\n"),        # empty record
    (b"\nRPa@x\n", b"\nRPa@x\nOorphan\n"),         # O without its R
    (b"\nRPa@x\n", b"\nOx\nOy\nRPa@x\n"),          # repeated O
    (b"E\n", b"E\nE\n"),                           # end record in the middle
    (b"E\n", b"F\n"),                              # no end record
])
def test_damaged_files(tmp_path, old, new):
    path, _ = write_file(tmp_path, rcpts=["a@x"], attrs={"ret": "FULL"})
    data = open(path, "rb").read()
    if old == b"E\n":
        damaged = data[:-2] + new
    else:
        assert old in data
        damaged = data.replace(old, new, 1)
    with pytest.raises(QueueFileError):
        parse_bytes(tmp_path, damaged)


def test_envelope_without_recipients_or_sender(tmp_path):
    head = b"HPYMTA1 %016d\nM" % 2 + b"hi\n"
    with pytest.raises(QueueFileError, match="recipients"):
        parse_bytes(tmp_path, head + b"T1.0\nSa@b\nE\n")
    with pytest.raises(QueueFileError, match="sender"):
        parse_bytes(tmp_path, head + b"T1.0\nRPa@b\nE\n")
    with pytest.raises(QueueFileError, match="time"):
        parse_bytes(tmp_path, head + b"Sa@b\nRPa@b\nE\n")
    parse_bytes(tmp_path, head + b"T1.0\nSa@b\nRPa@b\nE\n")


def test_content_shrinking_after_open_is_detected(tmp_path):
    path, _ = write_file(tmp_path, content=b"x" * 1000)
    with open_file(path) as f:
        os.truncate(path, CONTENT_OFFSET + 10)
        with pytest.raises(QueueFileError):
            f.read_content()
        with pytest.raises(QueueFileError):
            list(f.content_chunks())


def test_not_a_regular_file(tmp_path):
    d = os.open(str(tmp_path), os.O_RDONLY)
    with pytest.raises(QueueFileError):
        QueueFile.from_fd(d, str(tmp_path), "x", readonly=True)


def test_symlink_is_refused(tmp_path):
    path, qid = write_file(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(QueueFileError, match="symbolic link"):
        QueueFile.open_path(str(link), qid)


# -- fuzzing: arbitrary bytes only ever raise QueueFileError -------------------------

_fuzz = settings(max_examples=300, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])


@_fuzz
@given(st.binary(max_size=400))
def test_fuzz_arbitrary_bytes(tmp_path, data):
    for stage in (STAGE_QUEUE, STAGE_POST):
        parses_or_rejects(tmp_path, data, stage)


@_fuzz
@given(st.binary(max_size=200))
def test_fuzz_arbitrary_envelope_after_valid_header(tmp_path, tail):
    data = b"HPYMTA1 %016d\nM" % 3 + b"ab\n\n" + tail
    for stage in (STAGE_QUEUE, STAGE_POST):
        parses_or_rejects(tmp_path, data, stage)


@_fuzz
@given(st.data())
def test_fuzz_mutated_valid_file(tmp_path, data):
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    path, _ = write_file(src, rcpts=["a@x", {"address": "b@y", "orig": "o", "notify": "NEVER"}],
                         attrs={"ret": "FULL", "envid": "e"})
    raw = bytearray(open(path, "rb").read())
    os.unlink(path)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    parses_or_rejects(tmp_path, bytes(raw))


_text = st.text(st.characters(blacklist_characters="\r\n\0", blacklist_categories=("Cs",)),
                max_size=40)


@_fuzz
@given(sender=_text, rcpts=st.lists(st.tuples(_text.filter(bool), st.none() | _text),
                                    min_size=1, max_size=5),
       attrs=st.dictionaries(st.from_regex(r"[a-z_]{1,10}", fullmatch=True), _text, max_size=4),
       content=st.binary(max_size=300))
def test_fuzz_round_trip(tmp_path, sender, rcpts, attrs, content):
    w = make_writer(tmp_path)
    w.set_sender(sender)
    for addr, orig in rcpts:
        w.add_recipient(addr, orig=orig)
    for k, v in attrs.items():
        w.set_attr(k, v)
    w.write_content(content)
    w.commit()
    with open_file(w.path) as f:
        assert f.sender == sender
        assert [(r.address, r.orig) for r in f.recipients] == rcpts
        assert f.attrs == attrs
        assert f.read_content() == content
    os.unlink(w.path)


def test_post_stage_envelope_limit_in_writer(tmp_path):
    w = make_writer(tmp_path, STAGE_POST)
    w.set_sender("u@h")
    for i in range(4500):
        w.add_recipient(f"{i}{'r' * 4000}@example.org")
    with pytest.raises(ValueError, match="envelope larger"):
        w.commit()
    assert os.listdir(tmp_path) == []
    w = make_writer(tmp_path, STAGE_POST)
    with pytest.raises(ValueError, match="longer than"):
        w.add_recipient("r" * 5000)
    w.abort()
