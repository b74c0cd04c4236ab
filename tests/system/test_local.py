"""local, the delivery agent, driven the way qmgr drives it.

Each test starts a real instance whose master.cf holds only `local`, puts
queue files into active/ with the Queue API and sends delivery requests
over run/private/local (docs/delivery-protocol.md) itself; then it looks at
the replies, the mailboxes (byte for byte), the queue and the log.
"""

import os
import pwd
import random
import re
import socket
import stat
import subprocess
import threading
import time

import argon2
import pytest

from pymta.core import ipc, maildir, users
from pymta.core.dsn import parse_dsn
from pymta.core.queue import Queue
from pymta.core.queue_id import new_queue_id
from pymta.services import local as local_mod

ROOT = os.geteuid() == 0
CHEAP = argon2.profiles.CHEAPEST
SENDER = "sender@example.org"
BODY = (b"From: Sender <sender@example.org>\nTo: someone\nSubject: test\n"
        b"Message-Id: <1@example.org>\n\nline one\n\nFrom the start of a line\n"
        b"last line without newline")


def mail_owner_uid():
    return pwd.getpwnam("pymta").pw_uid if ROOT else os.geteuid()


class Agent:
    """Talks to a running instance's local service the way qmgr does."""

    def __init__(self, inst):
        self.inst = inst
        self.queue = Queue(inst.path("spool"))
        self.socket_path = inst.path("run", "private", "local")
        self.mail = inst.path("mail", inst.domain)

    def queue_message(self, recipients, content=BODY, sender=SENDER, attrs=None):
        w = self.queue.create("active")
        w.set_sender(sender)
        for r in recipients:
            if isinstance(r, tuple):
                w.add_recipient(r[0], orig=r[1])
            else:
                w.add_recipient(r)
        for name, value in (attrs or {}).items():
            w.set_attr(name, value)
        w.write_content(content)
        return w.commit()

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(60)
        s.connect(self.socket_path)
        return s, s.makefile("rwb")

    def request(self, qid, indexes, conn=None):
        """Send one request; return (status attrs, [per-recipient dicts])."""
        own = conn is None
        if own:
            conn = self.connect()
        _, f = conn
        now = time.time()
        pairs = [("request", "deliver"), ("queue_name", "active"), ("queue_id", qid),
                 ("transport", "local"), ("nexthop", self.inst.domain),
                 ("active_time", f"{now:.6f}"), ("dispatch_time", f"{now:.6f}")]
        pairs += [("rcpt", str(i)) for i in indexes]
        f.write(ipc.encode(pairs))
        f.flush()
        reply = ipc.read_attrs_sync(f)
        if own:
            f.close()
            conn[0].close()
        groups = []
        for name, value in reply[1:]:
            if name == "rcpt":
                groups.append({})
            if groups:
                groups[-1][name] = value
        return reply, groups

    def deliver(self, recipients, content=BODY, sender=SENDER, attrs=None):
        """Queue a message for `recipients` and deliver all of them."""
        qid = self.queue_message(recipients, content, sender, attrs)
        reply, groups = self.request(qid, range(len(recipients)))
        assert reply.get("status") == "ok", reply
        return qid, groups

    def box(self, local, folder=None):
        path = os.path.join(self.mail, local)
        return maildir.folder_path(path, folder) if folder else path


def new_files(box):
    """(name, bytes) of the files in a maildir's new/, sorted."""
    d = os.path.join(box, "new")
    if not os.path.isdir(d):
        return []
    out = []
    for name in sorted(os.listdir(d)):
        with open(os.path.join(d, name), "rb") as f:
            out.append((name, f.read()))
    return out


def expected(rcpt, sender=SENDER, content=BODY):
    return (f"Return-Path: <{sender}>\nDelivered-To: {rcpt.lower()}\n").encode() + content


def write(path, text, mode=0o644):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def make_outdir(inst):
    """A directory every delivery identity may write to."""
    out = inst.path("out")
    os.makedirs(out, exist_ok=True)
    os.chmod(out, 0o1777)
    return out


def start_local(inst, aliases="", main_cf="", vusers=("alice", "bob")):
    inst.write_master_cf("local unix - n n - - local\n")
    for name in vusers:
        users.add_user(os.path.join(inst.etc, "users"), f"{name}@{inst.domain}", "pw",
                       params=CHEAP)
    with open(os.path.join(inst.etc, "aliases"), "a") as f:
        f.write(aliases)
    if main_cf:
        with open(os.path.join(inst.etc, "main.cf"), "a") as f:
            f.write(main_cf)
    inst.start()
    return Agent(inst)


@pytest.fixture
def agent(instance):
    return start_local(instance)


# -- virtual users -----------------------------------------------------------------

def test_virtual_user_gets_the_message_byte_exact(agent):
    inst = agent.inst
    qid, groups = agent.deliver([(f"alice@{inst.domain}", f"Alice.Orig@{inst.domain}")])
    assert groups == [{"rcpt": "0", "result": "sent", "dsn": "2.0.0",
                       "reason": "delivered to maildir", "relay": "local"}]
    files = new_files(agent.box("alice"))
    assert len(files) == 1
    name, data = files[0]
    assert data == expected(f"alice@{inst.domain}")
    assert name.endswith(f",S={len(data)}")
    st = os.stat(os.path.join(agent.box("alice"), "new", name))
    assert st.st_uid == mail_owner_uid() and stat.S_IMODE(st.st_mode) == 0o600
    assert os.stat(agent.box("alice")).st_uid == mail_owner_uid()
    assert os.listdir(os.path.join(agent.box("alice"), "tmp")) == []
    line = inst.wait_log(f"{qid}: to=<alice@{inst.domain}>")
    m = re.search(rf"pymta/local\[\d+\]: {qid}: to=<alice@{inst.domain}>, "
                  rf"orig_to=<Alice.Orig@{inst.domain}>, relay=local, "
                  r"delay=([0-9.]+), delays=([0-9.]+)/([0-9.]+)/0/([0-9.]+), "
                  r"dsn=2\.0\.0, status=sent \(delivered to maildir\)", inst.log())
    assert m, line


def test_unknown_users_bounce_with_5_1_1(agent):
    inst = agent.inst
    qid, groups = agent.deliver([f"nosuch@{inst.domain}", "nosuchsysuser@localhost"])
    assert [(g["result"], g["dsn"], g["reason"]) for g in groups] == [
        ("bounced", "5.1.1", f'unknown user: "nosuch@{inst.domain}"'),
        ("bounced", "5.1.1", 'unknown user: "nosuchsysuser"'),
    ]
    inst.wait_log(f'{qid}: to=<nosuchsysuser@localhost>, relay=local')
    assert (f'dsn=5.1.1, status=bounced (unknown user: "nosuch@{inst.domain}")'
            in inst.log())


def test_luser_relay_and_an_alias_matched_without_its_extension(instance):
    agent = start_local(instance, "team: alice\n",
                        main_cf="luser_relay = bob+$user@test.example\n")
    inst = agent.inst
    _, groups = agent.deliver(["nosuch@localhost", f"team+x@{inst.domain}"])
    assert [g["result"] for g in groups] == ["sent", "sent"]
    assert [d for _, d in new_files(agent.box("bob"))] == [expected("nosuch@localhost")]
    assert [d for _, d in new_files(agent.box("alice"))] == [expected(f"team+x@{inst.domain}")]
    inst.wait_log("to=<bob+nosuch@test.example>, orig_to=<nosuch@localhost>")


def test_extension_goes_to_inbox_or_to_an_existing_folder(agent):
    inst = agent.inst
    agent.deliver([f"alice@{inst.domain}"])
    uid = mail_owner_uid()
    maildir.create_maildir(agent.box("alice", "Work"), uid, uid, folder=True)
    _, groups = agent.deliver([f"alice+news@{inst.domain}", f"alice+Work@{inst.domain}"])
    assert [g["result"] for g in groups] == ["sent", "sent"]
    inbox = new_files(agent.box("alice"))
    assert len(inbox) == 2
    assert expected(f"alice+news@{inst.domain}") in [d for _, d in inbox]
    assert [d for _, d in new_files(agent.box("alice", "Work"))] == [
        expected(f"alice+Work@{inst.domain}")]


def test_duplicates_in_one_request_are_delivered_once(instance):
    agent = start_local(instance, "twice: alice, alice@test.example\n")
    inst = agent.inst
    qid, groups = agent.deliver([f"alice@{inst.domain}", f"ALICE@{inst.domain}",
                                 f"twice@{inst.domain}"])
    assert [g["result"] for g in groups] == ["sent", "sent", "sent"]
    assert [d for _, d in new_files(agent.box("alice"))] == [expected(f"alice@{inst.domain}")]
    inst.wait_log(f"{qid}: to=<ALICE@{inst.domain}>")
    assert inst.log().count(f"{qid}: to=<alice@{inst.domain}>, relay=local") == 1


def test_persistent_connections_several_at_once(agent):
    inst = agent.inst
    errors = []

    def worker(n):
        conn = agent.connect()
        try:
            for _ in range(n):
                qid = agent.queue_message([f"bob@{inst.domain}"])
                reply, groups = agent.request(qid, [0], conn)
                if reply.get("status") != "ok" or groups[0]["result"] != "sent":
                    errors.append((reply, groups))
        finally:
            conn[1].close()
            conn[0].close()

    threads = [threading.Thread(target=worker, args=(5,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert len(new_files(agent.box("bob"))) == 20


def test_bad_requests(agent):
    inst = agent.inst
    reply, _ = agent.request(new_queue_id(1, time.time()), [0])
    assert reply.get("status") == "error" and "not found" in reply.get("reason")
    qid = agent.queue_message([f"alice@{inst.domain}"])
    reply, _ = agent.request(qid, [3])
    assert reply.get("status") == "error" and "out of range" in reply.get("reason")
    s, f = agent.connect()
    f.write(b"request=deliver\nqueue_name=../etc\n\n")
    f.flush()
    assert f.read() == b""          # a malformed request closes the connection
    s.close()
    assert new_files(agent.box("alice")) == []


# -- aliases ---------------------------------------------------------------------------

def test_alias_to_two_users(instance):
    agent = start_local(instance, "team: alice@test.example, bob\nrouted: alice@test.example\n")
    inst = agent.inst
    qid, groups = agent.deliver([f"team@{inst.domain}"])
    assert groups == [{"rcpt": "0", "result": "sent", "dsn": "2.0.0",
                       "reason": "alias expanded", "relay": "local",
                       "action": "expanded"}]
    for user in ("alice", "bob"):
        assert [d for _, d in new_files(agent.box(user))] == [expected(f"team@{inst.domain}")]
    inst.wait_log(f"{qid}: to=<bob@{inst.domain}>, orig_to=<team@{inst.domain}>")
    assert f"{qid}: to=<alice@{inst.domain}>, orig_to=<team@{inst.domain}>" in inst.log()
    # A recipient routed to local from another domain (transport_maps) is
    # local, as with Postfix's local(8): never forwarded back into the queue.
    _, groups = agent.deliver(["routed@elsewhere.example"])
    assert groups[0]["result"] == "sent"
    assert len(new_files(agent.box("alice"))) == 2


def test_alias_to_command_and_exit_codes(instance):
    out = make_outdir(instance)
    agent = start_local(instance, (
        f"cmd: \"|/usr/bin/tee {out}/cmd.out\"\n"
        "tempfail: \"|/bin/sh -c 'exit 75'\"\n"
        "permfail: \"|/bin/sh -c 'echo oops; exit 1'\"\n"
        "nouser: \"|/bin/sh -c 'exit 67'\"\n"))
    inst = agent.inst
    qid, groups = agent.deliver([f"cmd@{inst.domain}", f"tempfail@{inst.domain}",
                                 f"permfail@{inst.domain}", f"nouser@{inst.domain}"])
    assert [(g["result"], g["dsn"], g["reason"]) for g in groups] == [
        ("sent", "2.0.0", f"delivered to command: /usr/bin/tee {out}/cmd.out"),
        ("deferred", "4.3.0", "temporary failure"),
        ("bounced", "5.3.0", "Command died with status 1: \"/bin/sh -c 'echo oops; "
                             "exit 1'\". Command output: oops"),
        ("bounced", "5.1.1", "user unknown"),
    ]
    with open(os.path.join(out, "cmd.out"), "rb") as f:
        data = f.read()
    assert data.startswith(f"From {SENDER}  ".encode())
    assert data.split(b"\n", 1)[1] == expected(f"cmd@{inst.domain}")
    owner = pwd.getpwnam("nobody").pw_uid if ROOT else os.geteuid()
    assert os.stat(os.path.join(out, "cmd.out")).st_uid == owner
    inst.wait_log(f"status=sent (delivered to command: /usr/bin/tee {out}/cmd.out)")


def test_alias_to_file_appends_mbox(instance):
    out = make_outdir(instance)
    agent = start_local(instance, f"tofile: {out}/mbox, /dev/null\n")
    inst = agent.inst
    for _ in range(2):
        _, groups = agent.deliver([f"tofile@{inst.domain}"])
        assert groups[0]["result"] == "sent" and groups[0]["action"] == "expanded"
    with open(os.path.join(out, "mbox"), "rb") as f:
        data = f.read()
    one = (b"Return-Path: <sender@example.org>\nDelivered-To: tofile@test.example\n"
           + BODY.replace(b"\nFrom the", b"\n>From the") + b"\n\n")
    messages = data.split(b"From sender@example.org  ")
    assert messages[0] == b"" and len(messages) == 3
    for m in messages[1:]:
        assert m.split(b"\n", 1)[1] == one
    inst.wait_log(f"status=sent (delivered to file: {out}/mbox)")
    assert "status=sent (delivered to file: /dev/null)" in inst.log()


def test_include_file(instance):
    lists = instance.path("lists")
    os.makedirs(lists)
    write(os.path.join(lists, "team"), "# the team\nalice@test.example\n  bob, \n")
    agent = start_local(instance, f"inc: :include:{lists}/team\n")
    inst = agent.inst
    _, groups = agent.deliver([f"inc@{inst.domain}"])
    assert groups[0]["result"] == "sent"
    for user in ("alice", "bob"):
        assert [d for _, d in new_files(agent.box(user))] == [expected(f"inc@{inst.domain}")]


def test_alias_loop_bounces_once(instance):
    agent = start_local(instance, "loopa: loopb\nloopb: loopa\nself: self, alice\n")
    inst = agent.inst
    _, groups = agent.deliver([f"loopa@{inst.domain}"])
    assert [(g["result"], g["dsn"], g["reason"]) for g in groups] == [
        ("bounced", "5.4.6", "loopa@mx.test.example: alias database loop for loopa")]
    # An alias that names itself delivers to the user of that name; "self"
    # has no mailbox, alice gets hers.
    _, groups = agent.deliver([f"self@{inst.domain}"])
    assert groups[0]["result"] == "bounced" and "unknown user" in groups[0]["reason"]
    assert len(new_files(agent.box("alice"))) == 1


def test_alias_diamonds_do_not_multiply(instance):
    # 12 levels of 10 references each: 10**12 paths, one destination.
    levels = "".join(f"d{i}: " + ", ".join([f"d{i + 1}"] * 10) + "\n" for i in range(12))
    agent = start_local(instance, levels + "d12: alice@test.example\n")
    started = time.monotonic()
    _, groups = agent.deliver([f"d0@{instance.domain}"])
    assert groups[0]["result"] == "sent"
    assert time.monotonic() - started < 10
    assert len(new_files(agent.box("alice"))) == 1


def test_delivered_to_loop_bounces_5_4_6(agent):
    inst = agent.inst
    looped = f"Delivered-To: alice@{inst.domain}\n".encode() + BODY
    _, groups = agent.deliver([f"alice@{inst.domain}", f"bob@{inst.domain}"], looped)
    assert (groups[0]["result"], groups[0]["dsn"], groups[0]["reason"]) == (
        "bounced", "5.4.6", f"mail forwarding loop for alice@{inst.domain}")
    assert groups[1]["result"] == "sent"
    assert new_files(agent.box("alice")) == []


def test_forward_to_remote_address_queues_a_new_message(instance):
    agent = start_local(instance, "ext: someone@example.net, alice\n")
    inst = agent.inst
    qid, groups = agent.deliver([f"ext@{inst.domain}"], attrs={"envid": "E1"})
    assert groups[0]["result"] == "sent"
    inst.wait_log(f"{qid}: to=<someone@example.net>, orig_to=<ext@{inst.domain}>")
    m = re.search(rf"{qid}: to=<someone@example\.net>.*status=sent \(forwarded as (\w+)\)",
                  inst.log())
    assert m
    new = agent.queue.open("incoming", m.group(1), readonly=True)
    try:
        assert new.sender == SENDER
        assert [r.address for r in new.recipients] == ["someone@example.net"]
        assert new.attrs.get("envid") == "E1"
        content = new.read_content()
    finally:
        new.close()
    assert content.startswith(b"Received: ")
    assert f"\nDelivered-To: ext@{inst.domain}\n".encode() in content
    assert content.endswith(BODY)
    assert len(new_files(agent.box("alice"))) == 1


def test_owner_alias_gets_the_errors(instance):
    agent = start_local(instance, "owned: alice, nobody-here\nowner-owned: bob\n")
    inst = agent.inst
    qid, groups = agent.deliver([f"owned@{inst.domain}"])
    assert groups[0]["result"] == "sent"
    [(_, data)] = new_files(agent.box("alice"))
    assert data.startswith(b"Return-Path: <owner-owned@mx.test.example>\n")
    inst.wait_log(f"{qid}: sender non-delivery notification")
    m = re.search(rf"{qid}: sender non-delivery notification: (\w+)", inst.log())
    report = agent.queue.open("incoming", m.group(1), readonly=True)
    try:
        assert report.sender == ""
        assert [r.address for r in report.recipients] == ["owner-owned@mx.test.example"]
        parsed = parse_dsn(report.read_content())
    finally:
        report.close()
    assert parsed.recipients[0]["status"] == "5.1.1"
    assert "nobody-here@mx.test.example" in parsed.recipients[0]["final-recipient"]


# -- system users -----------------------------------------------------------------------

@pytest.fixture
def system_user(instance):
    """A system user with its home in the instance (root), or us."""
    if not ROOT:
        yield pwd.getpwuid(os.geteuid())
        return
    name = "pmt%06d" % random.randrange(10 ** 6)
    home = instance.path("home", name)
    os.makedirs(os.path.dirname(home), exist_ok=True)
    subprocess.run(["useradd", "--no-create-home", "--home-dir", home, "--shell",
                    "/bin/sh", name], check=True, capture_output=True)
    try:
        pw = pwd.getpwnam(name)
        os.makedirs(home)
        os.chown(home, pw.pw_uid, pw.pw_gid)
        yield pw
    finally:
        subprocess.run(["userdel", name], check=True, capture_output=True)


def test_dot_forward_of_a_system_user(instance, system_user):
    out = make_outdir(instance)
    pw = system_user
    if ROOT:
        forward = os.path.join(pw.pw_dir, ".forward")
        main_cf = ""
        entries = f'alice@{instance.domain}, \\{pw.pw_name}, "|/usr/bin/tee {out}/fwd.out"\n'
    else:
        forward = instance.path("forward-" + pw.pw_name)
        main_cf = f"forward_path = {instance.path('forward-$user')}\n"
        entries = f'alice@{instance.domain}, "|/usr/bin/tee {out}/fwd.out"\n'
    write(forward, entries)
    os.chown(forward, pw.pw_uid, pw.pw_gid)
    agent = start_local(instance, main_cf=main_cf)
    inst = agent.inst
    rcpt = f"{pw.pw_name}@{inst.hostname}"
    qid, groups = agent.deliver([rcpt])
    assert groups[0]["result"] == "sent", groups
    assert [d for _, d in new_files(agent.box("alice"))] == [expected(rcpt)]
    assert os.stat(os.path.join(out, "fwd.out")).st_uid == pw.pw_uid
    if ROOT:
        box = os.path.join(pw.pw_dir, "Maildir")
        [(name, data)] = new_files(box)
        assert data == expected(rcpt)
        assert os.stat(os.path.join(box, "new", name)).st_uid == pw.pw_uid
        assert os.stat(box).st_uid == pw.pw_uid
    inst.wait_log(f"{qid}: to=<alice@{inst.domain}>, orig_to=<{rcpt}>")


def test_system_user_mailbox_and_folder(instance, system_user):
    pw = system_user
    if ROOT:
        main_cf = ""
        box = os.path.join(pw.pw_dir, "Maildir")
    else:
        # An absolute home_mailbox keeps the test out of our real home.
        box = instance.path("selfbox")
        main_cf = f"home_mailbox = {box}/\n"
    agent = start_local(instance, main_cf=main_cf)
    agent.deliver([f"{pw.pw_name}@localhost"])
    maildir.create_maildir(os.path.join(box, ".Lists"), pw.pw_uid, pw.pw_gid, folder=True)
    _, groups = agent.deliver([f"{pw.pw_name}+Lists@localhost"])
    assert groups[0]["result"] == "sent"
    assert [d for _, d in new_files(os.path.join(box, ".Lists"))] == [
        expected(f"{pw.pw_name}+Lists@localhost")]
    assert len(new_files(box)) == 1


# -- limits and errors ------------------------------------------------------------------

def test_mailbox_size_limit_bounces_5_2_2(instance):
    agent = start_local(instance, main_cf="mailbox_size_limit = 200\n")
    inst = agent.inst
    small = b"Subject: s\n\nok\n"
    _, groups = agent.deliver([f"alice@{inst.domain}", f"bob@{inst.domain}"], small)
    assert [g["result"] for g in groups] == ["sent", "sent"]
    _, groups = agent.deliver([f"alice@{inst.domain}"], BODY + b"x" * 100)
    assert (groups[0]["result"], groups[0]["dsn"]) == ("bounced", "5.2.2")
    assert "mailbox_size_limit 200" in groups[0]["reason"]
    assert len(new_files(agent.box("alice"))) == 1


def test_disk_error_defers_never_bounces(agent):
    inst = agent.inst
    agent.deliver([f"alice@{inst.domain}"])
    tmp = os.path.join(agent.box("alice"), "tmp")
    os.chmod(tmp, 0o500)
    try:
        _, groups = agent.deliver([f"alice@{inst.domain}"])
    finally:
        os.chmod(tmp, 0o700)
    assert (groups[0]["result"], groups[0]["dsn"]) == ("deferred", "4.2.0")
    assert "Permission denied" in groups[0]["reason"]
    assert len(new_files(agent.box("alice"))) == 1
    assert os.listdir(tmp) == []


# -- pieces of local ------------------------------------------------------------------

def test_split_destinations():
    assert local_mod.split_destinations(
        'a, b c,"|cmd x, y" , /file name, :include:/x y,\n# no\n"q r"@x') == [
        "a", "b", "c", "|cmd x, y", "/file name", ":include:/x y", '"q r"@x']


def test_expand_macros():
    values = {"home": "/h", "extension": "x", "user": "u"}
    assert local_mod.expand_macros("$home/.forward${extension?+$extension}", values) == "/h/.forward+x"
    assert local_mod.expand_macros("${missing:none} $(user)", values) == "none u"


def test_delivered_to_set_reads_the_header_only():
    msg = b"Delivered-To: A@x\ndelivered-to:  <b@y>\n\nDelivered-To: c@z\n"
    assert local_mod.delivered_to_set(msg) == {"a@x", "b@y"}


@pytest.mark.parametrize("force_fork", [False, True])
def test_privileges_switch_one_thread_only(force_fork):
    p = local_mod.Privileges(force_fork=force_fork)
    nobody = local_mod.Creds.of(pwd.getpwnam("nobody"))
    seen = {}

    def job():
        seen["ids"] = p.run(nobody, lambda: (os.geteuid(), os.getegid()))

    t = threading.Thread(target=job)
    t.start()
    t.join()
    want = (nobody.uid, nobody.gid) if ROOT else (os.geteuid(), os.getegid())
    assert seen["ids"] == want
    assert (os.geteuid(), os.getegid()) == ((0, 0) if ROOT else seen["ids"])
    assert p.per_thread is not force_fork
