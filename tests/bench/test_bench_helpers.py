"""Unit tests of the benchmark harness's pure helpers (no servers, fast):
medians and ratios, the report section and its markers, the Maildir and
fsync helpers, Postfix queue file copies, argument parsing, the password
hash both POP3 servers share."""

import os
import socket

import pytest

from tests.bench import report
from tests.bench.anchors import BENCH_ADDR
from tests.bench.pymta_side import Pymta
from tests.bench.report import BEGIN, END, Row
from tests.bench.run import parse_args
from tests.bench.util import (
    Generator, clear_maildir, fsync_rate, maildir_count, port_listening, process_tree,
    tree_cpu_seconds,
)
from tests.bench.workloads import Settings, clone_postfix_deferred, maildir_message


def rows_w1():
    pf = Row("W1-4k", "W1 end to end, 4 KiB", "msg/s", "higher", "Postfix", anchor=True)
    py = Row("W1-4k", "W1 end to end, 4 KiB", "msg/s", "higher", "pymta")
    for v in (400, 440, 420):
        pf.add(v, 0.2, 1.5, 900)
    for v in (210, 190, 200):
        py.add(v, 0.2, 3.0, 800)
    return [pf, py]


def test_median_and_ratio_of_pymta_over_anchor():
    pf, py = rows_w1()
    assert pf.median == 420 and py.median == 200
    assert report.ratio([pf, py], py) == pytest.approx(200 / 420)
    assert report.ratio([pf, py], pf) is None


def test_no_ratio_without_anchor_samples_and_reason_shown():
    pf, py = rows_w1()
    pf.values.clear()
    assert report.ratio([pf, py], py) is None
    na = Row("W4", "W4 POP3", "ms", "lower", "pymta", reason="not available: no pop3d")
    table = report.text_table([pf, py, na])
    assert "not available: no pop3d" in table
    md = report.markdown_table([pf, py, na])
    assert md.count("\n") == 4 and "| not available: no pop3d |" in md


def test_markdown_rewrites_only_between_markers(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_text(f"# Title\n\nhand-written intro\n\n{BEGIN}\nold table\n{END}\n\n"
                    "## Profile\nfindings kept\n")
    meta = {"invocation": "make bench", "date": "d", "machine": "m", "commit": "c",
            "postfix": "Postfix 3.7", "dovecot": "Dovecot 2.3", "python": "3.11", "rounds": 3}
    report.write_markdown(str(path), rows_w1(), meta, ["smtp-source -s 20"], "# intro\n")
    text = path.read_text()
    assert "hand-written intro" in text and "findings kept" in text
    assert "old table" not in text
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    assert "| W1 end to end, 4 KiB |" in text and "smtp-source -s 20" in text


def test_markdown_new_file_gets_intro(tmp_path):
    path = tmp_path / "new.md"
    meta = {"invocation": "x", "date": "d", "machine": "m", "commit": "c", "postfix": "p",
            "dovecot": "d", "python": "3", "rounds": 1}
    report.write_markdown(str(path), rows_w1(), meta, [], "# Benchmarks\n")
    assert path.read_text().startswith("# Benchmarks\n\n" + BEGIN)


def test_maildir_count_and_clear(tmp_path):
    md = tmp_path / "m"
    for sub in ("new", "cur", "tmp"):
        (md / sub).mkdir(parents=True)
    (md / "new" / "1.a").write_bytes(b"x")
    (md / "cur" / "2.b:2,S").write_bytes(b"x")
    (md / "new" / ".hidden").write_bytes(b"x")
    (md / "tmp" / "3.c").write_bytes(b"x")
    assert maildir_count(str(md)) == 2
    clear_maildir(str(md))
    assert maildir_count(str(md)) == 0 and os.listdir(md / "tmp") == []
    assert maildir_count(str(tmp_path / "missing")) == 0


def test_clear_maildir_moves_messages_to_the_trash_when_set(tmp_path):
    """With a trash directory, clearing frees no inode: the messages are
    renamed there, each clearing into a directory of its own."""
    from tests.bench import util
    md = tmp_path / "m"
    for sub in ("new", "cur", "tmp"):
        (md / sub).mkdir(parents=True)
    (md / "new" / "1.a").write_bytes(b"x")
    (md / "cur" / "2.b:2,S").write_bytes(b"y")
    inode = os.stat(md / "new" / "1.a").st_ino
    util.set_trash(str(tmp_path / "trash"))
    try:
        clear_maildir(str(md))
        (md / "new" / "3.c").write_bytes(b"z")
        clear_maildir(str(md))
    finally:
        util.set_trash(None)
    assert maildir_count(str(md)) == 0
    assert sorted(os.listdir(tmp_path / "trash" / "1")) == ["cur.2.b:2,S", "new.1.a"]
    assert os.listdir(tmp_path / "trash" / "2") == ["new.3.c"]
    assert os.stat(tmp_path / "trash" / "1" / "new.1.a").st_ino == inode


def test_fsync_rate_leaves_nothing_behind(tmp_path):
    assert fsync_rate(str(tmp_path), count=5) > 0
    assert os.listdir(tmp_path) == []


def test_maildir_message_size():
    data = maildir_message(7, 4096)
    assert abs(len(data) - 4096) < 80 and b"Subject: bench message 7\n" in data


def test_clone_postfix_deferred_names_match_inodes(tmp_path):
    spool = tmp_path / "spool"
    (spool / "deferred" / "1").mkdir(parents=True)
    (spool / "defer" / "1").mkdir(parents=True)
    (spool / "deferred" / "1" / "1B1C424A2C9").write_bytes(b"queue file")
    (spool / "defer" / "1" / "1B1C424A2C9").write_bytes(b"defer log")
    clone_postfix_deferred(str(spool), 5, 2_000_000_000, (os.getuid(), os.getgid()))
    found = []
    for d, _sub, files in os.walk(spool / "deferred"):
        for name in files:
            path = os.path.join(d, name)
            found.append(name)
            assert os.path.basename(d) == name[0]
            assert int(name[5:], 16) == os.stat(path).st_ino or name == "1B1C424A2C9"
            assert os.stat(path).st_mtime == 2_000_000_000
            assert open(os.path.join(spool, "defer", name[0], name), "rb").read() == b"defer log"
    assert len(found) == 6
    made = [spool / top / sub for top in ("deferred", "defer")
            for sub in os.listdir(spool / top) if sub != "1"]
    assert made
    for d in made:
        st = os.stat(d)
        assert st.st_mode & 0o777 == 0o700 and st.st_uid == os.getuid()


def test_process_tree_cpu_and_generator():
    gen = Generator(["/bin/sh", "-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo ok"])
    gen.start()
    assert gen.proc.pid in process_tree(os.getpid())
    assert tree_cpu_seconds(os.getpid()) > 0
    gen.finish(30)
    assert gen.returncode == 0 and gen.stdout.strip() == "ok" and gen.cpu > 0
    assert gen.finish(30) is gen


def test_generator_time_limit_kills():
    gen = Generator(["/bin/sleep", "30"]).start()
    gen.finish(0.2)
    assert gen.returncode == -9 and gen.elapsed < 10


def test_port_listening_reads_proc():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        assert port_listening(s.getsockname()[1])
    finally:
        s.close()


def test_args_and_quick_settings():
    a = parse_args(["--quick", "--only", "w1,W4"])
    assert a.quick and a.selected == ["W1", "W4"]
    assert parse_args([]).selected == ["W1", "W2", "W4", "W5", "W6"]
    with pytest.raises(SystemExit):
        parse_args(["--only", "W3"])
    q = Settings.make(quick=True)
    assert (q.rounds, q.smtp_count, q.scale_count) == (1, 500, 5000)
    assert Settings.make(rounds=5).rounds == 5


def test_password_hash_is_the_bench_users_field(tmp_path):
    inst = Pymta(str(tmp_path / "i"), 0)
    assert inst.password_hash() is None
    os.makedirs(inst.etc)
    stored = "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2g"
    with open(os.path.join(inst.etc, "users"), "w") as f:
        f.write("# user@domain:{ARGON2ID}hash::::::\n")
        f.write(f"other@{BENCH_ADDR.split('@')[1]}:{{PLAIN}}x::::::\n")
        f.write(f"{BENCH_ADDR}:{stored}::::::\n")
    assert inst.password_hash() == stored
