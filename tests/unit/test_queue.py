"""The spool: directories, atomic entry, moves, scans, logs, maildrop."""

import os
import pwd
import shutil
import stat
import tempfile
import time
import traceback

import pytest

from pymta.core.qfile import QueueFileError
from pymta.core.queue import (
    DIR_MODES, HASH_CHARS, LOG_NAMES, QUEUE_NAMES, Queue,
)
from pymta.core.queue_id import new_queue_id, valid_queue_id
from pymta.core.safeio import (
    atomic_write, fsync_dir, open_exclusive, pread_exact, pwrite_all, write_all,
)

MSG = b"Subject: hello\n\nbody\n"


@pytest.fixture
def queue(tmp_path):
    q = Queue(str(tmp_path / "spool"))
    q.create_dirs()
    yield q
    q.close()


def put(q, queue_name="incoming", rcpts=("bob@example.net",), content=MSG):
    w = q.create(queue_name)
    w.set_sender("alice@example.org")
    for r in rcpts:
        w.add_recipient(r)
    w.write_content(content)
    return w.commit()


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


# -- directories -------------------------------------------------------------------

def test_create_dirs_modes(queue):
    top = queue.directory
    assert mode(top) == 0o755
    assert mode(os.path.join(top, "maildrop")) == 0o1733
    for name in QUEUE_NAMES + LOG_NAMES:
        if name != "maildrop":
            assert mode(os.path.join(top, name)) == 0o700, name
    for name in ("incoming", "active", "deferred", "hold", "defer", "bounce"):
        subdirs = sorted(os.listdir(os.path.join(top, name)))
        assert subdirs == sorted(HASH_CHARS)
        assert all(mode(os.path.join(top, name, d)) == 0o700 for d in subdirs)
    assert os.listdir(os.path.join(top, "maildrop")) == []
    assert os.listdir(os.path.join(top, "corrupt")) == []
    assert set(DIR_MODES) == set(QUEUE_NAMES + LOG_NAMES)
    assert queue.check_dirs(owner_uid=os.getuid()) == []


def test_create_dirs_repairs_and_check_reports(queue):
    os.chmod(os.path.join(queue.directory, "active"), 0o755)
    os.rmdir(os.path.join(queue.directory, "hold", "7"))
    problems = queue.check_dirs()
    assert any("active: mode 0755, expected 0700" in p for p in problems)
    assert any(p.endswith("hold/7: missing") for p in problems)
    queue.create_dirs()
    assert queue.check_dirs() == []


def test_depth_two(tmp_path):
    q = Queue(str(tmp_path / "spool"), hash_depth=2)
    q.create_dirs()
    qid = put(q)
    rel = os.path.relpath(q.path("incoming", qid), q.directory).split(os.sep)
    assert len(rel) == 4 and rel[0] == "incoming" and rel[3] == qid
    assert list(q.scan("incoming")) == [qid]
    assert q.check_dirs() == []


# -- entering the queue ------------------------------------------------------------

def test_create_commit_open(queue):
    qid = put(queue, rcpts=["a@x", "b@x"])
    assert valid_queue_id(qid)
    path = queue.path("incoming", qid)
    parent = os.path.basename(os.path.dirname(path))
    assert len(parent) == 1 and parent in HASH_CHARS
    assert os.listdir(os.path.dirname(path)) == [qid]
    with queue.open("incoming", qid) as f:
        assert f.queue_id == qid
        assert [r.address for r in f.pending()] == ["a@x", "b@x"]
        assert f.read_content() == MSG
        assert abs(f.arrival_time - time.time()) < 60


def _record_calls(monkeypatch):
    calls = []
    for name in ("fsync", "rename", "write"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, (lambda n, r: lambda *a: calls.append(n) or r(*a))(name, real))
    return calls


def _written(queue):
    """A new message with its envelope and content, not committed."""
    w = queue.create()
    w.set_sender("a@b")
    w.add_recipient("c@d")
    w.write_content(MSG)
    return w


def test_commit_syscalls(queue, monkeypatch):
    """Every byte written, then the rename, then one fsync of the file
    (which also makes the entry durable on Linux file systems)."""
    calls = _record_calls(monkeypatch)
    w = _written(queue)
    calls.clear()
    w.commit()
    assert calls == ["write", "rename", "fsync"]


def test_maildrop_commit_syncs_the_directory(queue, monkeypatch):
    """write_maildrop keeps the portable order: fsync, rename, directory fsync."""
    calls = _record_calls(monkeypatch)
    queue.write_maildrop("a@b", ["c@d"], MSG)
    assert calls[-3:] == ["fsync", "rename", "fsync"]


def test_failed_fsync_after_rename_removes_the_file(queue, monkeypatch):
    """Not acknowledged, not queued: an fsync error leaves no file behind."""
    w = _written(queue)

    def failing(fd):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError):
        w.commit()
    monkeypatch.undo()
    assert list(queue.scan("incoming")) == []
    hashed = os.path.join(queue.directory, "incoming")
    assert all(os.listdir(os.path.join(hashed, d)) == [] for d in HASH_CHARS)


def test_uncommitted_file_is_invisible(queue):
    w = queue.create()
    w.set_sender("a@b")
    w.add_recipient("c@d")
    w.write_content(MSG)
    assert list(queue.scan("incoming")) == []
    assert queue.find(w.queue_id) is None
    w.abort()
    hashed = os.path.join(queue.directory, "incoming")
    assert all(os.listdir(os.path.join(hashed, d)) == [] for d in HASH_CHARS)


def test_crashed_writer_leaves_only_stale_temp(queue):
    pid = os.fork()
    if pid == 0:
        try:
            w = queue.create()
            w.write_content(b"half a message")
        finally:
            os._exit(0)          # no commit, no abort: like kill -9
    os.waitpid(pid, 0)
    assert list(queue.scan("incoming")) == []
    assert queue.remove_stale_temp("incoming") == 0              # too young to remove
    assert queue.remove_stale_temp("incoming", now=time.time() + 37 * 3600) == 1
    hashed = os.path.join(queue.directory, "incoming")
    assert all(os.listdir(os.path.join(hashed, d)) == [] for d in HASH_CHARS)


def test_create_only_in_queues(queue):
    for name in ("maildrop", "corrupt", "defer", "nonsense"):
        with pytest.raises(ValueError):
            queue.create(name)


def test_unique_ids_from_concurrent_processes(queue):
    pids = []
    for _ in range(4):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for _ in range(100):
                    put(queue)
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    for pid in pids:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    ids = list(queue.scan("incoming"))
    assert len(ids) == 400 == len(set(ids))


# -- moves and removal -------------------------------------------------------------

def test_move_find_exists_remove(queue):
    qid = put(queue)
    assert queue.find(qid) == "incoming"
    ino = os.stat(queue.path("incoming", qid)).st_ino
    queue.move(qid, "incoming", "active")
    assert queue.find(qid) == "active"
    assert not queue.exists("incoming", qid) and queue.exists("active", qid)
    assert os.stat(queue.path("active", qid)).st_ino == ino
    queue.move(qid, "active", "deferred")
    queue.append_log("defer", qid, "bob@example.net", "4.4.1", "deferred", "connection refused")
    queue.append_log("bounce", qid, "x@example.net", "5.1.1", "bounced", "unknown user")
    queue.remove("deferred", qid)
    assert queue.find(qid) is None
    assert queue.read_log("defer", qid) == [] and queue.read_log("bounce", qid) == []
    with pytest.raises(FileNotFoundError):
        queue.remove("deferred", qid)
    with pytest.raises(FileNotFoundError):
        queue.move(qid, "deferred", "active")
    with pytest.raises(FileNotFoundError):
        queue.open("deferred", qid)


def test_move_to_hold_is_fsynced_others_not(queue, monkeypatch):
    qid = put(queue)
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real(fd))
    queue.move(qid, "incoming", "active")
    queue.move(qid, "active", "deferred")
    assert synced == []
    queue.move(qid, "deferred", "hold")
    assert len(synced) == 1
    queue.move(qid, "hold", "deferred")
    assert len(synced) == 2
    queue.move(qid, "deferred", "active", sync=True)
    assert len(synced) == 3


def test_mark_done_survives_moves(queue):
    qid = put(queue, rcpts=["a@x", "b@x"])
    queue.move(qid, "incoming", "active")
    with queue.open("active", qid) as f:
        f.mark_done(0)
    queue.move(qid, "active", "deferred")
    with queue.open("deferred", qid) as f:
        assert [r.address for r in f.pending()] == ["b@x"]


def test_next_attempt_is_mtime(queue):
    qid = put(queue)
    queue.move(qid, "incoming", "deferred")
    when = time.time() + 3600
    queue.set_next_attempt("deferred", qid, when)
    assert queue.next_attempt("deferred", qid) == pytest.approx(when, abs=0.01)
    queue.move(qid, "deferred", "active")
    assert queue.next_attempt("active", qid) == pytest.approx(when, abs=0.01)
    queue.move(qid, "active", "deferred")
    assert [(q, round(t)) for q, t in queue.scan_times("deferred")] == [(qid, round(when))]


def test_to_corrupt(queue):
    qid = put(queue)
    queue.move(qid, "incoming", "active")
    queue.to_corrupt("active", qid, "bad header\nsecond line")
    assert queue.find(qid) == "corrupt"
    assert list(queue.scan("corrupt")) == [qid]          # the .reason file is not listed
    assert queue.corrupt_reason(qid) == "active: bad header second line"
    assert queue.corrupt_reason(new_queue_id()) == ""


@pytest.mark.parametrize("bad", ["../../etc/passwd", "", ".tmp.1.2", "a/b", "x" * 100])
def test_hostile_ids_never_reach_the_file_system(queue, bad):
    with pytest.raises(ValueError):
        queue.path("incoming", bad)
    with pytest.raises(ValueError):
        queue.open("incoming", bad)
    with pytest.raises(ValueError):
        queue.remove("incoming", bad)
    assert queue.find(bad) is None
    with pytest.raises(ValueError):
        queue.path("../etc", new_queue_id())


# -- scanning ----------------------------------------------------------------------

def test_scan_skips_temp_and_junk(queue):
    qid = put(queue)
    d = os.path.dirname(queue.path("incoming", qid))
    open(os.path.join(d, ".tmp.123.abcdef"), "w").close()
    open(os.path.join(d, "not-an-id"), "w").close()
    os.mkdir(os.path.join(d, "subdir-with-long-name"))
    os.symlink("/etc/passwd", os.path.join(d, new_queue_id()))
    w = queue.create()                     # in progress
    assert list(queue.scan("incoming")) == [qid]
    w.abort()
    with pytest.raises(ValueError):
        list(queue.scan("nonsense"))


def test_scan_20000_hashed_files(queue):
    d_in = os.path.join(queue.directory, "incoming")
    made = set()
    for _ in range(20_000):
        qid = new_queue_id()
        made.add(qid)
        open(queue.path("incoming", qid), "wb").close()
    per_dir = [len(os.listdir(os.path.join(d_in, c))) for c in HASH_CHARS]
    assert sum(per_dir) == 20_000
    assert max(per_dir) < 20_000 / 16 * 1.5, per_dir        # spread over the 16 dirs
    start = time.monotonic()
    found = list(queue.scan("incoming"))
    elapsed = time.monotonic() - start
    assert set(found) == made and len(found) == 20_000
    assert elapsed < 2.0, elapsed
    qid = sorted(made)[12345]
    assert queue.exists("incoming", qid) and queue.find(qid) == "incoming"


def test_rehash_after_depth_change(tmp_path):
    flat = Queue(str(tmp_path / "spool"), hash_depth=0)
    flat.create_dirs()
    qids = [put(flat) for _ in range(5)]
    hashed = Queue(str(tmp_path / "spool"), hash_depth=1)
    hashed.create_dirs()
    assert sorted(hashed.scan("incoming")) == sorted(qids)   # still found
    with pytest.raises(FileNotFoundError):
        hashed.open("incoming", qids[0])
    assert hashed.rehash() == 5
    assert hashed.rehash() == 0
    for qid in qids:
        hashed.open("incoming", qid).close()


# -- defer and bounce logs -----------------------------------------------------------

def test_logs_round_trip(queue, monkeypatch):
    qid = put(queue)
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real(fd))
    queue.append_log("defer", qid, "bob@example.net", "4.4.1", "deferred",
                     "connect to mx[192.0.2.1]:25: Connection refused\r\nmore",
                     {"relay": "mx[192.0.2.1]:25", "action": "delayed"})
    assert len(synced) == 2                       # the log, and its new directory entry
    queue.append_log("defer", qid, "carol@example.net", "4.2.2", "deferred", "mailbox full")
    assert len(synced) == 3                       # an append: the log only
    entries = queue.read_log("defer", qid)
    assert [e["recipient"] for e in entries] == ["bob@example.net", "carol@example.net"]
    assert entries[0]["reason"] == "connect to mx[192.0.2.1]:25: Connection refused  more"
    assert entries[0]["relay"] == "mx[192.0.2.1]:25" and entries[0]["dsn"] == "4.4.1"
    assert float(entries[0]["time"]) == pytest.approx(time.time(), abs=60)
    assert queue.read_log("bounce", qid) == []
    queue.remove_log("defer", qid)
    assert queue.read_log("defer", qid) == []
    queue.remove_log("defer", qid)


def test_log_torn_last_entry_is_ignored(queue):
    qid = put(queue)
    queue.append_log("bounce", qid, "a@x", "5.1.1", "bounced", "unknown user")
    with open(queue.path("bounce", qid), "ab") as f:
        f.write(b"recipient=b@x\ndsn=5.")
    assert [e["recipient"] for e in queue.read_log("bounce", qid)] == ["a@x"]


def test_log_rejects_bad_input(queue):
    qid = put(queue)
    with pytest.raises(ValueError):
        queue.append_log("trace", qid, "a@x", "5.0.0", "bounced", "x")
    with pytest.raises(ValueError):
        queue.append_log("defer", qid, "a@x", "4.0.0", "deferred", "x", {"bad=name": "v"})
    with pytest.raises(ValueError):
        queue.append_log("defer", qid, "a@x", "4.0.0", "deferred", "x", {"recipient": "other"})
    with open(queue.path("defer", qid), "wb") as f:
        f.write(b"garbage without equals\n\n")
    with pytest.raises(QueueFileError):
        queue.read_log("defer", qid)


# -- maildrop --------------------------------------------------------------------------

def test_maildrop_round_trip(queue):
    name = queue.write_maildrop("user@host", ["a@x", "b@y"], b"Subject: s\n\nhi\n",
                                {"full_name": "A User", "ret": "HDRS"}, notify="FAILURE")
    path = os.path.join(queue.directory, "maildrop", name)
    assert mode(path) == 0o644
    assert list(queue.scan("maildrop")) == [name]
    with queue.read_maildrop(name) as f:
        assert f.owner_uid == os.getuid()
        assert f.sender == "user@host"
        assert [(r.address, r.notify) for r in f.recipients] == [("a@x", "FAILURE"), ("b@y", "FAILURE")]
        assert f.attrs == {"full_name": "A User", "ret": "HDRS"}
        assert f.read_content() == b"Subject: s\n\nhi\n"
        with pytest.raises(ValueError):
            f.mark_done(0)
    queue.remove("maildrop", name)
    assert list(queue.scan("maildrop")) == []


def test_maildrop_written_by_unprivileged_user():
    """As root, post as `nobody` into the 1733 directory; otherwise the test
    user is the unprivileged one.  Either way pickup sees who posted."""
    root = os.geteuid() == 0
    uid = pwd.getpwnam("nobody").pw_uid if root else os.geteuid()
    base = tempfile.mkdtemp(prefix="pymta-maildrop-")
    os.chmod(base, 0o711)                   # nobody must reach spool/maildrop
    queue = Queue(os.path.join(base, "spool"))
    try:
        queue.create_dirs()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(r)
                if root:
                    os.setgroups([])
                    os.setgid(pwd.getpwnam("nobody").pw_gid)
                    os.setuid(uid)
                name = queue.write_maildrop("me", ["you@x"], b"x\n", {})
                os.write(w, name.encode())
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(w)
        name = os.read(r, 100).decode()
        os.close(r)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        with queue.read_maildrop(name) as f:
            assert f.owner_uid == uid
            assert f.sender == "me"
        queue.remove("maildrop", name)      # pickup, as the directory owner, may
    finally:
        queue.close()
        shutil.rmtree(base)


def test_maildrop_writer_refuses_privileged_attributes(queue):
    for attrs in ({"client_address": "10.0.0.1"}, {"rewrite_context": "remote"}):
        with pytest.raises(ValueError):
            queue.write_maildrop("u", ["a@b"], b"x\n", attrs)
    with pytest.raises(ValueError):
        queue.write_maildrop("u\nRPinjected@x", ["a@b"], b"x\n", {})
    assert os.listdir(os.path.join(queue.directory, "maildrop")) == []


def test_maildrop_hostile_files(queue, tmp_path):
    md = os.path.join(queue.directory, "maildrop")
    good = queue.write_maildrop("u", ["a@b"], b"x\n", {})

    with pytest.raises(QueueFileError):
        queue.read_maildrop("../incoming/x")
    with pytest.raises(QueueFileError):
        queue.read_maildrop(".tmp.1.abc")

    link = new_queue_id()
    os.symlink(os.path.join(md, good), os.path.join(md, link))
    with pytest.raises(QueueFileError, match="symbolic link"):
        queue.read_maildrop(link)

    hard = new_queue_id()
    os.link(os.path.join(md, good), os.path.join(md, hard))
    with pytest.raises(QueueFileError, match="links"):
        queue.read_maildrop(hard)
    os.unlink(os.path.join(md, hard))

    fifo = new_queue_id()
    os.mkfifo(os.path.join(md, fifo))
    with pytest.raises(QueueFileError, match="regular"):
        queue.read_maildrop(fifo)                 # must not block

    qid = put(queue)                              # a full queue file is not a post file
    garbage = new_queue_id()
    with open(queue.path("incoming", qid), "rb") as src, open(os.path.join(md, garbage), "wb") as dst:
        dst.write(src.read())
    with pytest.raises(QueueFileError, match="not allowed"):
        queue.read_maildrop(garbage)

    big = queue.write_maildrop("u", ["a@b"], b"y" * 10_000, {})
    with pytest.raises(QueueFileError, match="larger"):
        queue.read_maildrop(big, max_content=1000)

    with pytest.raises(FileNotFoundError):
        queue.read_maildrop(new_queue_id())

    # scan lists every named entry, so that pickup can reject and remove them
    assert set(queue.scan("maildrop")) == {good, link, fifo, garbage, big}
    queue.read_maildrop(good).close()


# -- safeio, the primitives underneath ---------------------------------------------------

def test_atomic_write(tmp_path):
    target = tmp_path / "aliases.db"
    atomic_write(str(target), b"one\n", mode=0o640)
    assert target.read_bytes() == b"one\n" and mode(target) == 0o640
    ino = os.stat(target).st_ino
    atomic_write(str(target), b"two\n")
    assert target.read_bytes() == b"two\n" and mode(target) == 0o600
    assert os.stat(target).st_ino != ino, "replaced by rename, not rewritten"
    assert os.listdir(tmp_path) == ["aliases.db"]


def test_open_exclusive_refuses_existing_and_symlinks(tmp_path):
    existing = tmp_path / "f"
    existing.write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        open_exclusive(str(existing))
    dangling = tmp_path / "link"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError):
        open_exclusive(str(dangling))
    assert not (tmp_path / "nowhere").exists()
    fd = open_exclusive(str(tmp_path / "new"), 0o604, flags=os.O_RDWR, exact_mode=True)
    try:
        write_all(fd, b"0123456789")
        pwrite_all(fd, b"AB", 3)
        assert pread_exact(fd, 100, 0) == b"012AB56789"
        assert pread_exact(fd, 4, 8) == b"89"
    finally:
        os.close(fd)
    assert mode(tmp_path / "new") == 0o604
    fsync_dir(str(tmp_path))


def _topdir_flag(path):
    import fcntl
    import struct
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        flags = struct.unpack("I", fcntl.ioctl(fd, 0x80086601, b"\0" * 4))[0]
    finally:
        os.close(fd)
    return bool(flags & 0x00020000)


def test_create_dirs_spreads_the_queues_that_create_files(tmp_path):
    """incoming, defer and bounce (and the spool) carry FS_TOPDIR_FL where the
    file system has it, so their hashed subdirectories land in different
    block groups; the queues that only receive renames do not."""
    from pymta.core.safeio import mark_top_directory
    probe = tmp_path / "probe"
    probe.mkdir()
    if not mark_top_directory(str(probe)):
        # tmp_path is on a file system without the flag: then the hint is
        # a no-op, and create_dirs must still work.
        q = Queue(str(tmp_path / "spool"))
        q.create_dirs()
        assert q.check_dirs() == []
        return
    q = Queue(str(tmp_path / "spool"))
    q.create_dirs()
    assert q.check_dirs() == []
    for name in ("incoming", "defer", "bounce"):
        assert _topdir_flag(os.path.join(q.directory, name)), name
    assert _topdir_flag(q.directory)
    for name in ("active", "deferred", "hold", "corrupt", "maildrop"):
        assert not _topdir_flag(os.path.join(q.directory, name)), name


def test_mark_top_directory_is_a_no_op_where_the_flag_does_not_exist():
    """tmpfs has no FS_TOPDIR_FL: False, and the directory is unchanged."""
    from pymta.core.safeio import mark_top_directory
    d = tempfile.mkdtemp(dir="/dev/shm")
    try:
        assert mark_top_directory(d) is False
        assert os.path.isdir(d)
    finally:
        os.rmdir(d)


def test_create_dirs_places_directories_under_a_random_name_first(tmp_path):
    """The spread directories are made as .mkdir.* and renamed: none of
    those names is left, a second create_dirs changes nothing, and an
    existing entry of the same name is never replaced."""
    q = Queue(str(tmp_path / "spool"))
    q.create_dirs()
    q.create_dirs()
    assert q.check_dirs() == []
    leftovers = [p for p, _d, _f in os.walk(q.directory) if ".mkdir." in p]
    assert leftovers == []
    from pymta.core.queue import _mkdir_placed
    target = tmp_path / "spool" / "incoming" / "0"
    (target / "keep").write_text("x")
    with pytest.raises(FileExistsError):
        _mkdir_placed(str(target), 0o700)
    assert (target / "keep").read_text() == "x"
    assert not [n for n in os.listdir(target.parent) if n.startswith(".mkdir.")]


def test_place_then_sync(queue, monkeypatch):
    """smtpd's halves of a commit: place() writes and renames (visible,
    complete), sync() is the one fsync; an abort in between removes it."""
    calls = _record_calls(monkeypatch)
    w = _written(queue)
    calls.clear()
    w.place()
    assert calls == ["write", "rename"]
    assert list(queue.scan("incoming")) == [w.queue_id]
    assert queue.open("incoming", w.queue_id).read_content() == MSG
    assert w.sync() == w.queue_id
    assert calls == ["write", "rename", "fsync"]
    w.abort()                                   # no effect once committed
    assert list(queue.scan("incoming")) == [w.queue_id]

    w2 = _written(queue)
    w2.place()
    w2.abort()
    assert list(queue.scan("incoming")) == [w.queue_id]
    with pytest.raises(ValueError):
        w2.sync()
