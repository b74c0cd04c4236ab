"""The cleanup library against a real queue in tmp_path: envelope checks,
rewriting, headers, limits, the queue file it writes, logs and trigger."""

import errno
import os
import re
import socket

import hypothesis
import hypothesis.strategies as hst
import pytest

from pymta.core import cleanup, config, log
from pymta.core.cleanup import (
    Cleanup, Origin, Rcpt, extract_recipients, make_message_id, scan_headers,
)
from pymta.core.errors import PermFail, TempFail
from pymta.core.queue import Queue

HOST = "mx.example.org"


@pytest.fixture
def env(tmp_path):
    etc = tmp_path / "etc"
    etc.mkdir()

    class Env:
        queue = None

        def cleanup(self, **settings):
            lines = [f"myhostname = {HOST}", "mydomain = example.org"]
            lines += [f"{k} = {v}" for k, v in settings.items()]
            (etc / "main.cf").write_text("\n".join(lines) + "\n")
            cfg = config.load(str(etc))
            log.setup("cleanup-test", cfg)
            self.queue = Queue(cfg.queue_directory)
            self.queue.create_dirs()
            self.cfg = cfg
            return Cleanup(cfg, self.queue)

        def open(self, qid):
            return self.queue.open("incoming", qid, readonly=True)

        def content(self, qid):
            with self.open(qid) as f:
                return f.read_content()

        def incoming(self):
            return list(self.queue.scan("incoming"))

        def all_files(self):
            found = []
            for top, _dirs, files in os.walk(self.cfg.queue_directory):
                found += [os.path.join(top, f) for f in files]
            return found

        def log(self):
            try:
                return (tmp_path / "log" / "maillog").read_text()
            except FileNotFoundError:
                return ""

    (tmp_path / "log").mkdir()
    e = Env()
    e.dir = tmp_path
    yield e
    log.close()


LOCAL = Origin(protocol="local", uid=1000, user="alice")
REMOTE = Origin(protocol="ESMTPS", client_name="client.example.net", client_addr="192.0.2.7",
                helo="helo.example.net",
                tls_info="TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)")


def split_message(data):
    head, _, body = data.partition(b"\n\n")
    return head.decode().split("\n"), body


# -- local submissions ---------------------------------------------------------------

def test_local_submission_adds_received_and_missing_headers(env):
    c = env.cleanup()
    msg = b"Subject: hello\r\nTo: bob@example.org\r\n\r\nline 1\r\n.. not unstuffed\r\nbare\rcr \xe9\r\n"
    qid = c.submit("alice", ["bob@example.org"], msg, LOCAL, {"full_name": "Alice Liddell"},
                   local_submission=True)
    assert env.incoming() == [qid]
    with env.open(qid) as f:
        assert f.sender == f"alice@{HOST}"
        assert [(r.address, r.orig) for r in f.recipients] == [("bob@example.org", None)]
        assert f.attrs["full_name"] == "Alice Liddell"
        assert f.attrs["rewrite_context"] == "local"
        data = f.read_content()
    head, body = split_message(data)
    assert body == b"line 1\n.. not unstuffed\nbare\rcr \xe9\n"
    assert head[0] == f"Received: by {HOST} (pymta, from userid 1000)"
    assert re.fullmatch(rf"\tid {qid}; \w\w\w, \d\d? \w\w\w \d{{4}} \d\d:\d\d:\d\d [+-]\d{{4}}( \(\w+\))?",
                        head[1])
    assert head[2:4] == ["Subject: hello", "To: bob@example.org"]
    assert head[4].startswith("Date: ")
    mid = make_message_id(qid, HOST, f.arrival_time)
    assert re.fullmatch(rf"<\d{{14}}\.{qid}@{HOST}>", mid)
    assert head[5] == f"Message-Id: {mid}"
    assert head[6] == f"From: Alice Liddell <alice@{HOST}>"
    text = env.log()
    assert f"pymta/cleanup-test[{os.getpid()}]: {qid}: uid=1000 from=<alice>\n" in text
    assert f"{qid}: message-id={mid}\n" in text
    assert text.index("uid=1000") < text.index("message-id=")


def test_existing_headers_are_not_added_again(env):
    c = env.cleanup()
    msg = (b"From: Someone <s@example.org>\nDate: Mon, 1 Jan 2024 00:00:00 +0000\n"
           b"Message-ID: <abc@example.org>\n\nbody\n")
    qid = c.submit("s@example.org", ["bob@example.org"], msg, LOCAL, local_submission=True)
    data = env.content(qid)
    assert data.split(b"\n", 2)[2] == msg
    assert f"{qid}: message-id=<abc@example.org>" in env.log()


ADDED_RE = re.compile(rb"Date: [^\n]+\nMessage-Id: <[^\n]+>\nFrom: MAILER-DAEMON@" + HOST.encode() + rb"\n")


@pytest.mark.parametrize("msg,before,after", [
    # no header block at all: the added headers, a blank line, the text as is
    (b"just text\nmore\n", b"", b"\njust text\nmore\n"),
    # a header, then a line that is not one: it starts the body
    (b"A: 1\nnot a header\n", b"A: 1\n", b"\nnot a header\n"),
    # headers only, no body
    (b"Subject: x\n", b"Subject: x\n", b""),
    # last header without a newline
    (b"Subject: x", b"Subject: x\n", b""),
    # empty message
    (b"", b"", b""),
    # blank line first
    (b"\nbody\n", b"", b"\nbody\n"),
])
def test_unusual_shapes_keep_the_body_exact(env, msg, before, after):
    c = env.cleanup()
    qid = c.submit("", ["bob@example.org"], msg, Origin(), local_submission=True)
    first, second, rest = env.content(qid).split(b"\n", 2)
    assert first == f"Received: by {HOST} (pymta)".encode()
    assert second.startswith(f"\tid {qid}; ".encode())
    m = ADDED_RE.search(rest)
    assert m is not None
    assert (rest[:m.start()], rest[m.end():]) == (before, after)


def test_null_sender_from_header(env):
    c = env.cleanup()
    qid = c.submit("<>", ["bob@example.org"], b"Subject: bounce\n\nx\n", Origin(),
                   local_submission=True)
    with env.open(qid) as f:
        assert f.sender == ""
    assert f"\nFrom: MAILER-DAEMON@{HOST}\n".encode() in env.content(qid)
    assert "uid=" not in env.log()


def test_full_name_quoting_and_encoding(env):
    c = env.cleanup()
    q1 = c.submit("a", ["b@example.org"], b"\n", LOCAL, {"full_name": 'Dr. "Who", PhD'},
                  local_submission=True)
    assert f'From: "Dr. \\"Who\\", PhD" <a@{HOST}>'.encode() in env.content(q1)
    q2 = c.submit("a", ["b@example.org"], b"\n", LOCAL, {"full_name": "Zoë"},
                  local_submission=True)
    assert f"From: =?utf-8?q?Zo=C3=AB?= <a@{HOST}>".encode() in env.content(q2)


# -- network submissions -----------------------------------------------------------------

def test_network_received_header_and_attributes(env):
    c = env.cleanup()
    msg = b"Subject: x\r\n\r\nbody\r\n"
    qid = c.submit("s@example.net", ["bob@example.org"], msg, REMOTE)
    data = env.content(qid)
    head, body = split_message(data)
    assert head[:4] == [
        "Received: from helo.example.net (client.example.net [192.0.2.7])",
        "\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))",
        f"\tby {HOST} (pymta) with ESMTPS id {qid}",
        head[3],
    ]
    assert head[3].startswith("\tfor <bob@example.org>; ")
    assert head[4:] == ["Subject: x"]
    assert body == b"body\n"
    with env.open(qid) as f:
        assert f.attrs["client_name"] == "client.example.net"
        assert f.attrs["client_address"] == "192.0.2.7"
        assert f.attrs["helo_name"] == "helo.example.net"
        assert f.attrs["protocol_name"] == "ESMTPS"
        assert f.attrs["rewrite_context"] == "remote"
    assert f"{qid}: client=client.example.net[192.0.2.7]\n" in env.log()
    assert f"{qid}: message-id=<>\n" in env.log()


def test_network_received_without_tls_several_recipients_ipv6_and_sasl(env):
    c = env.cleanup()
    origin = Origin(protocol="ESMTPSA", client_name="unknown", client_addr="2001:db8::1",
                    helo="x\r\ny", sasl_method="PLAIN", sasl_username="alice@example.org")
    qid = c.submit("s@example.net", ["a@example.org", "b@example.org"], b"\n", origin)
    head, _ = split_message(env.content(qid))
    assert head[0] == "Received: from x??y (unknown [IPv6:2001:db8::1])"
    assert head[1].startswith(f"\tby {HOST} (pymta) with ESMTPSA id {qid}; ")
    assert (f"{qid}: client=unknown[2001:db8::1], sasl_method=PLAIN, "
            f"sasl_username=alice@example.org") in env.log()


def test_always_add_missing_headers(env):
    c = env.cleanup(always_add_missing_headers="yes")
    qid = c.submit("s@example.net", ["bob@example.org"], b"Subject: x\n\nb\n", REMOTE)
    data = env.content(qid)
    assert b"\nDate: " in data and b"\nMessage-Id: <" in data
    assert b"\nFrom: s@example.net\n" in data
    c = env.cleanup()
    qid = c.submit("s@example.net", ["bob@example.org"], b"Subject: x\n\nb\n", REMOTE)
    assert b"Date:" not in env.content(qid)


# -- limits and envelope checks -------------------------------------------------------------

def no_queue_files(env):
    return [f for f in env.all_files() if "/incoming/" in f] == []


def test_message_size_limit(env):
    c = env.cleanup(message_size_limit=1000)
    with pytest.raises(PermFail) as e:
        c.submit("a", ["b@example.org"], b"x" * 1001, LOCAL)
    assert (e.value.dsn, e.value.text) == ("5.3.4", "message file too big")
    assert no_queue_files(env)
    c.submit("a", ["b@example.org"], b"x" * 1000, LOCAL)


def test_crlf_counts_as_lf_for_the_size_limit(env):
    c = env.cleanup(message_size_limit=1000)
    c.submit("a", ["b@example.org"], b"x\r\n" * 500, LOCAL)


def test_header_size_limit(env):
    c = env.cleanup(header_size_limit=200)
    big = b"Subject: " + b"x" * 100 + b"\n " + b"y" * 100 + b"\n\nbody\n"
    with pytest.raises(PermFail) as e:
        c.submit("a", ["b@example.org"], big, LOCAL)
    assert e.value.dsn == "5.3.4" and "header" in e.value.text
    # The body may hold any long line.
    c.submit("a", ["b@example.org"], b"Subject: s\n\n" + b"z" * 10000 + b"\n", LOCAL)
    assert len(env.incoming()) == 1


def test_too_many_hops(env):
    c = env.cleanup()
    msg = b"Received: by x\n" * 51 + b"\nbody\n"
    with pytest.raises(PermFail) as e:
        c.submit("a", ["b@example.org"], msg, LOCAL)
    assert (e.value.dsn, e.value.text) == ("5.4.0", "too many hops")
    c.submit("a", ["b@example.org"], b"Received: by x\n" * 50 + b"\nbody\n", LOCAL)


@pytest.mark.parametrize("sender,rcpts,dsn", [
    ("a b@c", ["b@example.org"], "5.1.7"),
    ("a@", ["b@example.org"], "5.1.7"),
    ("a", ["b@@example.org"], "5.1.3"),
    ("a", [""], "5.1.3"),
    ("a", ["<>"], "5.1.3"),
    ("a", [], "5.1.0"),
    ("a", [Rcpt("b@example.org", notify="SOMETIMES")], "5.5.4"),
    ("a", [Rcpt("b@example.org", notify="NEVER,SUCCESS")], "5.5.4"),
    ("a", [Rcpt("b@example.org", orcpt="rfc822;x\ny")], "5.5.4"),
])
def test_envelope_errors(env, sender, rcpts, dsn):
    c = env.cleanup()
    with pytest.raises(PermFail) as e:
        c.submit(sender, rcpts, b"\n", LOCAL)
    assert e.value.dsn == dsn
    assert no_queue_files(env)


def test_bad_attribute_value_is_refused(env):
    c = env.cleanup()
    with pytest.raises(PermFail):
        c.submit("a", ["b@example.org"], b"\n", LOCAL, {"full_name": "x\ny"})
    with pytest.raises(PermFail):
        c.submit("a", ["b@example.org"], b"\n", LOCAL, {"bad name": "x"})
    assert no_queue_files(env)


def test_recipient_limit_and_duplicates(env):
    c = env.cleanup()
    c.max_recipients = 2
    qid = c.submit("a", ["x@example.org", "X@Example.ORG", "y@example.org"], b"\n", LOCAL)
    with env.open(qid) as f:
        assert [r.address for r in f.recipients] == ["x@example.org", "y@example.org"]
    with pytest.raises(PermFail) as e:
        c.submit("a", ["x@example.org", "y@example.org", "z@example.org"], b"\n", LOCAL)
    assert e.value.dsn == "5.5.3"


def test_dsn_parameters_and_attributes_are_stored(env):
    c = env.cleanup()
    qid = c.submit("a@example.org",
                   [Rcpt("b@example.org", notify="success,failure", orcpt="rfc822;B@example.org"),
                    "c@example.org"],
                   b"\n", LOCAL, {"ret": "HDRS", "envid": "E1"})
    with env.open(qid) as f:
        b, c2 = f.recipients
        assert (b.notify, b.orcpt) == ("SUCCESS,FAILURE", "rfc822;B@example.org")
        assert (c2.notify, c2.orcpt) == (None, None)
        assert f.attrs["ret"] == "HDRS" and f.attrs["envid"] == "E1"


def test_unqualified_addresses_get_myorigin(env):
    c = env.cleanup(myorigin="example.org")
    qid = c.submit("alice", ["bob", "<carol>"], b"\n", LOCAL)
    with env.open(qid) as f:
        assert f.sender == "alice@example.org"
        assert [r.address for r in f.recipients] == ["bob@example.org", "carol@example.org"]


# -- rewriting ----------------------------------------------------------------------------------

def test_canonical_maps(env, tmp_path):
    (tmp_path / "canonical").write_text("alice@example.org  Alice.Liddell@example.org\n"
                                        "@old.example  @example.org\n")
    c = env.cleanup(
        sender_canonical_maps="inline:{ root@mx.example.org=admin@example.org }",
        recipient_canonical_maps="inline:{ bob@example.org=robert@example.org }",
        canonical_maps=f"texthash:{tmp_path}/canonical")
    qid = c.submit("root", ["bob@example.org", "alice+tag@example.org", "joe@old.example"],
                   b"\n", LOCAL)
    with env.open(qid) as f:
        assert f.sender == "admin@example.org"
        assert [(r.address, r.orig) for r in f.recipients] == [
            ("robert@example.org", "bob@example.org"),
            ("Alice.Liddell+tag@example.org", "alice+tag@example.org"),
            ("joe@example.org", "joe@old.example")]


def test_canonical_nesting_limit_defers(env):
    c = env.cleanup(canonical_maps="inline:{ a@example.org=b@example.org, b@example.org=a@example.org }")
    with pytest.raises(TempFail) as e:
        c.submit("x@example.org", ["a@example.org"], b"\n", LOCAL)
    assert e.value.dsn == "4.3.0"
    assert "unreasonable canonical_maps map nesting" in env.log()


def test_virtual_alias_expansion(env):
    maps = ("inline:{ {list@example.org = a@example.org, sub@example.org, b@example.org}, "
            "{sub@example.org = c@example.org, d}, "
            "{self@example.org = self@example.org, e@example.org}, "
            "@alias.example=@example.org }")
    c = env.cleanup(virtual_alias_maps=maps, myorigin="example.org")
    qid = c.submit("x@example.org", ["list@example.org", "self@example.org", "z@alias.example",
                                     "c@example.org"], b"\n", LOCAL)
    with env.open(qid) as f:
        assert [(r.address, r.orig) for r in f.recipients] == [
            ("a@example.org", "list@example.org"),
            ("c@example.org", "list@example.org"),
            ("d@example.org", "list@example.org"),
            ("b@example.org", "list@example.org"),
            ("self@example.org", None),
            ("e@example.org", "self@example.org"),
            ("z@example.org", "z@alias.example")]


def test_virtual_alias_loop_defers(env):
    c = env.cleanup(virtual_alias_maps="inline:{ a@example.org=b@example.org, "
                                       "{b@example.org=c@example.org, a@example.org} }")
    with pytest.raises(TempFail) as e:
        c.submit("x@example.org", ["a@example.org"], b"\n", LOCAL)
    assert e.value.dsn == "4.3.0"
    assert "virtual_alias_maps loop for a@example.org" in env.log()
    assert no_queue_files(env)


def test_virtual_alias_expansion_limit(env, tmp_path, monkeypatch):
    import pymta.core.cleanup as cleanup_mod
    monkeypatch.setattr(cleanup_mod, "VIRTUAL_EXPANSION_LIMIT", 5)
    monkeypatch.setattr(cleanup_mod, "VIRTUAL_RECURSION_LIMIT", 3)
    many = ", ".join(f"u{i}@example.org" for i in range(6))
    (tmp_path / "virtual").write_text(f"big@example.org {many}\n"
                                      "d1@example.org d2@example.org\n"
                                      "d2@example.org d3@example.org\n"
                                      "d3@example.org d4@example.org\n"
                                      "d4@example.org d5@example.org\n")
    c = env.cleanup(virtual_alias_maps=f"texthash:{tmp_path}/virtual")
    with pytest.raises(TempFail):
        c.submit("x@example.org", ["big@example.org"], b"\n", LOCAL)
    assert "unreasonable virtual_alias_maps map expansion size for big@example.org" in env.log()
    with pytest.raises(TempFail):
        c.submit("x@example.org", ["d1@example.org"], b"\n", LOCAL)
    assert "unreasonable virtual_alias_maps map nesting for d1@example.org" in env.log()


def test_unreadable_table_defers(env, tmp_path):
    c = env.cleanup(virtual_alias_maps=f"texthash:{tmp_path}/missing")
    with pytest.raises(TempFail) as e:
        c.submit("x@example.org", ["a@example.org"], b"\n", LOCAL)
    assert (e.value.dsn, e.value.text) == ("4.3.0", "Temporary lookup failure")
    assert f"{tmp_path}/missing" in env.log()


def test_bad_address_in_a_table_result_defers(env):
    c = env.cleanup(virtual_alias_maps="inline:{ a@example.org=b@@x }")
    with pytest.raises(TempFail):
        c.submit("x@example.org", ["a@example.org"], b"\n", LOCAL)


# -- queue writing, trigger ------------------------------------------------------------------------

def test_write_errors_are_temporary(env, monkeypatch):
    c = env.cleanup()

    def full(*args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(env.queue, "create", full)
    with pytest.raises(TempFail) as e:
        c.submit("a", ["b@example.org"], b"\n", LOCAL)
    assert e.value.dsn == "4.3.1"


def test_commit_error_leaves_no_file(env, monkeypatch):
    c = env.cleanup()
    real_create = env.queue.create

    def create(*args, **kw):
        writer = real_create(*args, **kw)

        def fail():
            raise OSError(errno.EIO, "I/O error")
        writer.commit = fail
        return writer

    monkeypatch.setattr(env.queue, "create", create)
    with pytest.raises(TempFail) as e:
        c.submit("a", ["b@example.org"], b"x\n", LOCAL)
    assert e.value.dsn == "4.3.0"
    assert env.all_files() == []


def test_prepare_then_commit_in_a_thread(env):
    """smtpd's split: prepare (checks, the file's bytes) leaves only a
    temporary file; commit, in another thread, puts it in place; an
    aborted job leaves nothing."""
    import threading
    c = env.cleanup()
    job = c.prepare("a@example.org", ["b@example.org"], b"Subject: x\r\n\r\nbody\r\n", LOCAL)
    qid = job.writer.queue_id
    assert not env.queue.exists("incoming", qid)
    with pytest.raises(ValueError):
        job.writer.write_content(b"more")       # sealed: no more content
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("qid", c.commit(job)))
    t.start()
    t.join()
    assert out["qid"] == qid
    with env.queue.open("incoming", qid) as qf:
        assert qf.read_content().endswith(b"Subject: x\n\nbody\n")
        assert [r.address for r in qf.recipients] == ["b@example.org"]
    c.finish(job)
    other = c.prepare("a@example.org", ["b@example.org"], b"\n", LOCAL)
    other.writer.abort()
    assert env.all_files() == [env.queue.path("incoming", qid)]


def test_qmgr_is_triggered(env):
    c = env.cleanup()
    public = os.path.join(env.cfg.run_directory, "public")
    os.makedirs(public)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(os.path.join(public, "qmgr"))
    s.listen(5)
    s.settimeout(5)
    try:
        c.submit("a", ["b@example.org"], b"\n", LOCAL)
        conn, _ = s.accept()
        with conn:
            conn.settimeout(5)
            assert conn.recv(10) == b"I"
    finally:
        s.close()


# -- header scanning ----------------------------------------------------------------------------------

def test_scan_headers_stops_at_the_body():
    body = b"X-Looks-Like: a header\n" * 1000
    data = b"A: 1\nB: two\n  folded\nC : spaced name\n\n" + body
    hb = scan_headers(data)
    assert [f[0] for f in hb.fields] == [b"a", b"b", b"c"]
    assert hb.separator and data[hb.end:hb.end + 1] == b"\n"
    assert hb.value(data, 1) == "two  folded"
    assert hb.value(data, 2) == "spaced name"
    assert hb.find(b"x-looks-like") == -1


def test_scan_headers_without_separator():
    hb = scan_headers(b"A: 1\nnot a header\nB: 2\n")
    assert [f[0] for f in hb.fields] == [b"a"] and hb.end == 5 and not hb.separator
    hb = scan_headers(b" leading space\n")
    assert hb.fields == [] and hb.end == 0


def test_extract_recipients():
    msg = (b"From: me@example.org\nTo: A <a@example.org>, b@example.org\n"
           b"Cc: \"C, Jr\" <c@example.org>,\n d@example.org\nBcc: secret@example.org\n"
           b"Subject: s\nBCC: other@example.org\n\nTo: body@example.org\n")
    rcpts, data = extract_recipients(msg)
    assert rcpts == ["a@example.org", "b@example.org", "c@example.org", "d@example.org",
                     "secret@example.org", "other@example.org"]
    assert data == (b"From: me@example.org\nTo: A <a@example.org>, b@example.org\n"
                    b"Cc: \"C, Jr\" <c@example.org>,\n d@example.org\n"
                    b"Subject: s\n\nTo: body@example.org\n")


def test_extract_recipients_prefers_resent_headers():
    msg = (b"To: old@example.org\nResent-To: new@example.org\nResent-Bcc: hidden@example.org\n"
           b"Bcc: stays-unused@example.org\n\nbody\n")
    rcpts, data = extract_recipients(msg)
    assert rcpts == ["new@example.org", "hidden@example.org"]
    assert data == b"To: old@example.org\nResent-To: new@example.org\n\nbody\n"


def test_extract_recipients_group_syntax():
    rcpts, _ = extract_recipients(b"To: undisclosed-recipients:;\nCc: team: a@x.example, b@x.example;\n\n")
    assert rcpts == ["a@x.example", "b@x.example"]


@pytest.mark.parametrize("text,expect", [
    ("alice", ["alice"]),
    ("a@x.example, b@y.example", ["a@x.example", "b@y.example"]),
    ("Joe Q. Public <joe@x.example>", ["joe@x.example"]),
    ('"Smith, Jane" <jane@x.example>, bob@x.example (Bob)', ["jane@x.example", "bob@x.example"]),
    ("team: a@x.example, B <b@x.example>;, c@x.example", ["a@x.example", "b@x.example", "c@x.example"]),
    ("<@relay.example,@r2.example:u@x.example>", ["u@x.example"]),
    ('"odd \\" one"@x.example', ['"odd \\" one"@x.example']),
    ("user@[192.0.2.1]", ["user@[192.0.2.1]"]),
    ("<>", []),
    ("undisclosed-recipients:;", []),
    ("a@x.example,", ["a@x.example"]),
])
def test_parse_address_list(text, expect):
    from pymta.core.cleanup import parse_address_list
    assert parse_address_list(text) == expect


def test_submit_keeps_the_arrival_time(env):
    c = env.cleanup()
    qid = c.submit("a", ["b@example.org"], b"\n", LOCAL, arrival_time=1_700_000_000.5)
    with env.open(qid) as f:
        assert f.arrival_time == 1_700_000_000.5


def test_local_header_addresses_are_completed_and_canonical_mapped(env):
    c = env.cleanup(myorigin="example.org",
                    sender_canonical_maps="inline:{ root@example.org=admin@example.org }",
                    canonical_maps="inline:{ @old.example=@example.org }")
    msg = (b"From: Charlie Root <root>\nTo: alice, \"Bob, B\" <bob@old.example>,\n"
           b"\tcarol@old.example (Carol)\nCc: team: dave;\nSubject: To: alice\n"
           b"X-Other: root\n\nTo: alice\n")
    qid = c.submit("root", ["x@example.org"], msg, LOCAL, local_submission=True)
    head, body = split_message(env.content(qid))
    assert head[2:8] == [
        "From: Charlie Root <admin@example.org>",
        "To: alice@example.org, \"Bob, B\" <bob@example.org>,",
        "\tcarol@example.org (Carol)",
        "Cc: team: dave@example.org;",
        "Subject: To: alice",
        "X-Other: root",
    ]
    assert body == b"To: alice\n"
    with env.open(qid) as f:
        assert f.sender == "admin@example.org"


def test_remote_headers_are_not_rewritten(env):
    c = env.cleanup(canonical_maps="inline:{ @old.example=@example.org }")
    msg = b"From: a@old.example\nTo: bob\n\nx\n"
    qid = c.submit("a@old.example", ["bob@example.org"], msg, REMOTE)
    assert env.content(qid).endswith(msg)
    with env.open(qid) as f:
        assert f.sender == "a@example.org"


def test_header_rewriting_leaves_odd_addresses_alone(env):
    c = env.cleanup(canonical_maps="inline:{ a@example.org=b@example.org }")
    msg = (b"To: a@example.org (a@example.org)\nCc: not an address at all\n"
           b"Reply-To: a @ example.org\nSender: a@example.org <a@example.org>\n\nx\n")
    qid = c.submit("s@example.org", ["x@example.org"], msg, LOCAL, local_submission=True)
    head, _ = split_message(env.content(qid))
    # The address twice in one item, an unparsable item, blanks inside an
    # address: nothing there is replaced.  In <...> only the address changes.
    assert head[2:6] == ["To: a@example.org (a@example.org)", "Cc: not an address at all",
                         "Reply-To: a @ example.org", "Sender: a@example.org <b@example.org>"]


@hypothesis.settings(max_examples=3000, deadline=None)
@hypothesis.given(hst.text(alphabet='ab@.<>", ;:()[]\\ \t\u00a0xyZ-_é', max_size=16))
def test_address_spans_fast_path_agrees_with_the_scanner(text):
    """The regex shortcut for `Name <a@b>` and `a@b` gives exactly what the
    character scanner gives, for any text."""
    assert cleanup.address_spans(text) == cleanup._address_spans_scan(text)
