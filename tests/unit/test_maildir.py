"""Maildir++ delivery, naming, folders, quota and listing, on real files."""

import errno
import multiprocessing
import os
import re
import socket
import stat
import threading

import pytest

from pymta.core import maildir
from pymta.core.errors import PermFail, TempFail

MSG = b"From: a@example.org\nSubject: hi\n\nbody\n"
NAME_RE = re.compile(r"^(\d+)\.M(\d+)P(\d+)Q(\d+)\.(.+),S=(\d+)$")


def files(box, sub="new"):
    return sorted(os.listdir(os.path.join(box, sub)))


def test_deliver_creates_maildir_and_writes_byte_exact(tmp_path):
    box = tmp_path / "mail" / "example.org" / "alice"
    path = maildir.deliver(str(box), MSG)
    for sub in ("cur", "new", "tmp"):
        st = os.stat(box / sub)
        assert stat.S_IMODE(st.st_mode) & 0o077 == 0
    assert stat.S_IMODE(os.stat(box).st_mode) & 0o077 == 0
    assert os.path.dirname(path) == str(box / "new")
    assert files(box) == [os.path.basename(path)]
    assert files(box, "tmp") == []
    assert open(path, "rb").read() == MSG
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_unique_name_format_and_size(tmp_path):
    path = maildir.deliver(str(tmp_path / "m"), MSG)
    m = NAME_RE.match(os.path.basename(path))
    assert m, path
    secs, usecs, pid, _q, host, size = m.groups()
    assert int(usecs) < 1_000_000
    assert int(pid) == os.getpid()
    assert int(size) == len(MSG) == os.path.getsize(path)
    assert "/" not in host and ":" not in host and "," not in host


def test_hostname_is_sanitised(monkeypatch):
    monkeypatch.setattr(maildir, "_hostname", None)
    monkeypatch.setattr(socket, "gethostname", lambda: "a/b:c,S=1")
    name = maildir.unique_name(7, now_ns=1_700_000_000_123_456_789)
    assert name.startswith("1700000000.M123456P")
    assert name.endswith(".a\\057b\\072c\\054S=1,S=7")
    assert maildir.parse_size(name) == 7


def test_chunks_are_written_in_order(tmp_path):
    chunks = [b"Delivered-To: a@x\n", bytearray(b"Return-Path: <b@y>\n"),
              memoryview(MSG), b""]
    path = maildir.deliver(str(tmp_path / "m"), chunks)
    data = open(path, "rb").read()
    assert data == b"".join(bytes(c) for c in chunks)
    assert maildir.parse_size(os.path.basename(path)) == len(data)


def test_large_message(tmp_path):
    big = os.urandom(3 * 1024 * 1024 + 17)
    path = maildir.deliver(str(tmp_path / "m"), big)
    assert open(path, "rb").read() == big
    assert maildir.parse_size(path) == len(big)


def _deliver_many(box, n, marker):
    for i in range(n):
        maildir.deliver(box, b"X-Id: %s-%d\n\n" % (marker, i))


def _child(box, n, marker):
    _deliver_many(box, n, marker)
    os._exit(0)


def test_concurrent_threads_and_processes_get_unique_names(tmp_path):
    box = str(tmp_path / "m")
    maildir.create_maildir(box)
    per = 150
    threads = [threading.Thread(target=_deliver_many,
                                args=(box, per, b"t%d" % i)) for i in range(8)]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_child, args=(box, per, b"p%d" % i))
             for i in range(4)]
    for p in procs:
        p.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    names = files(box)
    assert len(names) == len(set(names)) == 12 * per
    bodies = set()
    for name in names:
        data = open(os.path.join(box, "new", name), "rb").read()
        assert maildir.parse_size(name) == len(data)
        bodies.add(data)
    assert len(bodies) == 12 * per      # no delivery overwrote another
    assert files(box, "tmp") == []


def test_syscall_budget_of_one_delivery(tmp_path, monkeypatch):
    box = str(tmp_path / "m")
    maildir.create_maildir(box)
    calls = []
    for fn in ("open", "writev", "write", "fsync", "fdatasync", "rename",
               "link", "close", "stat", "mkdir"):
        real = getattr(os, fn)

        def wrap(*a, _real=real, _fn=fn, **kw):
            calls.append(_fn)
            return _real(*a, **kw)
        monkeypatch.setattr(maildir.os, fn, wrap)
    maildir.deliver(box, MSG)
    assert calls == ["open", "writev", "fdatasync", "close", "rename",
                     "open", "fsync", "close"]
    calls.clear()
    maildir.deliver(box, MSG, sync_dir=False)
    assert calls == ["open", "writev", "fdatasync", "close", "rename"]


def test_batch_without_dir_fsync_then_sync_new_dirs(tmp_path, monkeypatch):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    paths = [maildir.deliver(box, MSG, sync_dir=False)
             for box in (a, b, a, a)]
    synced = []
    real = maildir.fsync_dir
    monkeypatch.setattr(maildir, "fsync_dir",
                        lambda d: (synced.append(d), real(d)))
    maildir.sync_new_dirs(paths)
    assert synced == [os.path.join(a, "new"), os.path.join(b, "new")]


def test_missing_maildir_without_create_is_temporary(tmp_path):
    with pytest.raises(maildir.MaildirTempError) as ei:
        maildir.deliver(str(tmp_path / "none"), MSG, create=False)
    assert isinstance(ei.value, TempFail)
    assert ei.value.dsn == "4.2.0"
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("err,dsn", [(errno.ENOSPC, "4.3.1"),
                                     (errno.EDQUOT, "4.2.2"),
                                     (errno.EIO, "4.3.0"),
                                     (errno.EACCES, "4.2.0")])
def test_disk_errors_defer_and_leave_no_tmp_file(tmp_path, monkeypatch, err,
                                                 dsn):
    box = str(tmp_path / "m")
    maildir.create_maildir(box)

    def failing_write(fd, chunks):
        raise OSError(err, os.strerror(err))
    monkeypatch.setattr(maildir, "_write_all", failing_write)
    with pytest.raises(maildir.MaildirTempError) as ei:
        maildir.deliver(box, MSG)
    assert isinstance(ei.value, TempFail) and not isinstance(ei.value,
                                                             PermFail)
    assert ei.value.dsn == dsn
    assert ei.value.errno == err
    assert os.strerror(err) in ei.value.text
    assert files(box, "tmp") == [] and files(box) == []


def test_rename_failure_defers_and_cleans_tmp(tmp_path, monkeypatch):
    box = str(tmp_path / "m")
    maildir.create_maildir(box)

    def failing_rename(src, dst):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(maildir.os, "rename", failing_rename)
    with pytest.raises(maildir.MaildirTempError) as ei:
        maildir.deliver(box, MSG)
    assert ei.value.dsn == "4.3.0"
    assert files(box, "tmp") == [] and files(box) == []


def test_quota_counts_s_fields_of_all_folders(tmp_path):
    box = str(tmp_path / "m")
    maildir.deliver(box, b"x" * 100)
    maildir.deliver(box, b"y" * 50, folder="Work")
    # a file from another program: no ,S= in its name, sized by stat
    with open(os.path.join(box, "cur", "123.foreign:2,S"), "wb") as f:
        f.write(b"z" * 30)
    assert maildir.maildir_size(box) == 180
    assert maildir.maildir_size(box, folders=False) == 130
    maildir.deliver(box, b"w" * 20, size_limit=200)
    assert maildir.maildir_size(box) == 200
    with pytest.raises(maildir.MaildirQuotaError) as ei:
        maildir.deliver(box, b"v", size_limit=200)
    assert isinstance(ei.value, PermFail)
    assert ei.value.dsn == "5.2.2"
    assert "mailbox full" in ei.value.text
    assert maildir.maildir_size(box) == 200


def test_message_larger_than_limit_is_permanent(tmp_path):
    with pytest.raises(maildir.MaildirQuotaError) as ei:
        maildir.deliver(str(tmp_path / "m"), b"x" * 11, size_limit=10)
    assert ei.value.dsn == "5.2.2"


def test_size_of_missing_maildir_is_zero(tmp_path):
    assert maildir.maildir_size(str(tmp_path / "none")) == 0


def test_folders(tmp_path):
    box = str(tmp_path / "m")
    maildir.create_maildir(box)
    assert not maildir.folder_exists(box, "Work")
    path = maildir.deliver(box, MSG, folder="Work")
    assert path.startswith(os.path.join(box, ".Work", "new") + os.sep)
    assert os.path.isfile(os.path.join(box, ".Work", "maildirfolder"))
    assert maildir.folder_exists(box, "Work")
    assert maildir.folder_exists(box, "INBOX")
    maildir.deliver(box, MSG, folder="Lists.python")
    assert maildir.folder_exists(box, "Lists.python")
    assert maildir.deliver(box, MSG, folder="inbox").startswith(
        os.path.join(box, "new"))
    with pytest.raises(maildir.MaildirTempError):
        maildir.deliver(box, MSG, folder="Other", create=False)


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", ".hidden",
                                  "a..b", "a.", "x\nY", "x\0", "a" * 300])
def test_hostile_folder_names(tmp_path, name):
    box = str(tmp_path / "m")
    maildir.create_maildir(box)
    assert not maildir.valid_folder_name(name)
    assert not maildir.folder_exists(box, name)
    with pytest.raises(ValueError):
        maildir.deliver(box, MSG, folder=name)
    assert sorted(os.listdir(box)) == ["cur", "new", "tmp"]


def test_create_is_idempotent_and_chowns(tmp_path):
    box = str(tmp_path / "home" / "Maildir")
    uid, gid = os.getuid(), os.getgid()
    maildir.create_maildir(box, uid=uid, gid=gid)
    maildir.create_maildir(box, uid=uid, gid=gid)
    path = maildir.deliver(box, MSG, uid=uid, gid=gid)
    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == (uid, gid)


def test_root_delivery_owned_by_user(tmp_path):
    """As root the maildir and message belong to the user; without root
    the chown fails and the delivery is deferred, leaving no message."""
    box = tmp_path / "home" / "Maildir"
    if os.geteuid() != 0:
        with pytest.raises(maildir.MaildirTempError) as ei:
            maildir.deliver(str(box), MSG, uid=0, gid=0)
        assert ei.value.dsn == "4.2.0"
        assert not box.exists() or maildir.message_list(str(box)) == []
        return
    path = maildir.deliver(str(box), MSG, folder="Work", uid=65534,
                           gid=65534)
    for p in (box.parent, box, box / "new", box / ".Work", box / ".Work" /
              "maildirfolder", path):
        st = os.stat(p)
        assert (st.st_uid, st.st_gid) == (65534, 65534), p
    assert os.stat(tmp_path).st_uid == 0


def test_unique_base_and_flags():
    name = "1700000000.M1P2Q3.host,S=42"
    assert maildir.unique_base(name) == name
    assert maildir.unique_base(name + ":2,RS") == name
    assert maildir.parse_flags(name + ":2,RS") == "RS"
    assert maildir.parse_flags(name + ":2,") == ""
    assert maildir.parse_flags(name + ":1,xyz") == ""
    assert maildir.parse_flags(name) == ""
    assert maildir.parse_size(name + ":2,S") == 42
    assert maildir.parse_size("1.M1P2.host,S=42,W=44:2,") == 42
    assert maildir.parse_size("1.M1P2.host") is None
    assert maildir.parse_size("1.host,S=" + "9" * 5000) is None
    assert maildir.parse_size("1.host,S=12x") is None


def test_message_list(tmp_path):
    box = str(tmp_path / "m")
    p1 = maildir.deliver(box, b"one\n")
    p2 = maildir.deliver(box, b"second\n")
    seen = os.path.join(box, "cur", os.path.basename(p1) + ":2,SR")
    os.rename(p1, seen)
    with open(os.path.join(box, "cur", "99.foreign:2,F"), "wb") as f:
        f.write(b"abc")
    with open(os.path.join(box, "new", ".hidden"), "wb") as f:
        f.write(b"ignored")
    os.mkdir(os.path.join(box, "cur", "adir"))
    msgs = maildir.message_list(box)
    assert msgs == sorted(msgs, key=lambda m: maildir.unique_base(m.filename))
    by_base = {maildir.unique_base(m.filename): m for m in msgs}
    assert len(msgs) == 3
    m1 = by_base[os.path.basename(p1)]
    assert (m1.subdir, m1.size, m1.flags) == ("cur", 4, "SR")
    m2 = by_base[os.path.basename(p2)]
    assert (m2.subdir, m2.filename, m2.size, m2.flags) == (
        "new", os.path.basename(p2), 7, "")
    assert tuple(by_base["99.foreign"]) == ("cur", "99.foreign:2,F", 3, "F")


def test_message_list_reports_a_message_in_both_dirs_once(tmp_path):
    box = str(tmp_path / "m")
    p = maildir.deliver(box, b"one\n")
    # a reader linked it into cur/ and has not yet removed it from new/
    os.link(p, os.path.join(box, "cur", os.path.basename(p) + ":2,S"))
    msgs = maildir.message_list(box)
    assert [(m.subdir, m.flags) for m in msgs] == [("cur", "S")]


def test_message_list_of_missing_maildir(tmp_path):
    assert maildir.message_list(str(tmp_path / "none")) == []
