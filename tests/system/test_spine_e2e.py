"""Issue 4's "Show it" list, end to end through the default instance.

Every test runs the master.cf that `pymta init` writes, started with
`pymta start`, and drives the real programs the way an operator or a user
would: `sendmail` (through pickup, or maildrop/ while the master is down),
SMTP with smtplib, `newaliases`, `pymta user add`, `postqueue -f`,
`mailq`, `kill -9`.  What is checked is what a user sees: the files in the
Maildirs (byte for byte), the DSNs they get, the log, the queue listing.
Unit-level and single-service tests live in test_sendmail.py, test_qmgr.py
(with a fake agent) and test_local.py (with hand-made requests).
"""

import email
import email.policy
import os
import pwd
import random
import re
import signal
import smtplib
import threading
import time

import pytest

from pymta.core.dsn import parse_dsn
from tests.conftest import BIN, run, wait_for

SENDMAIL = os.path.join(BIN, "sendmail")
# Deliveries by local: "QID: to=<x>, [orig_to=<y>, ]relay=local, delay=D,
# delays=a/b/c/d, dsn=X.Y.Z, status=S (reason)".
DELIVERY_RE = re.compile(
    r"pymta/local\[(\d+)\]: (\w+): to=<([^>]*)>, (?:orig_to=<([^>]*)>, )?relay=local, "
    r"delay=([0-9.]+), delays=([0-9.]+)/([0-9.]+)/([0-9.]+)/([0-9.]+), "
    r"dsn=(\d\.\d+\.\d+), status=(\w+) \((.*)\)$", re.M)


# -- helpers ---------------------------------------------------------------------------------

def sendmail(inst, *args, input, check=True):
    return run([SENDMAIL, "-C", inst.etc, *args], input=input, check=check)


def queued_id(p):
    """The queue id `sendmail -v` reports."""
    m = re.search(r"queued as (\w+)", p.stderr)
    assert m, p.stderr
    return m.group(1)


def add_users(inst, *names):
    for name in names:
        inst.pymta("user", "add", f"{name}@{inst.domain}", input="pw\n")


def box(inst, user):
    return inst.path("mail", inst.domain, user)


def maildir_files(path, sub="new"):
    """[(name, bytes)] of a Maildir's new/ (or tmp/, cur/), sorted by name."""
    d = os.path.join(path, sub)
    if not os.path.isdir(d):
        return []
    out = []
    for name in sorted(os.listdir(d)):
        with open(os.path.join(d, name), "rb") as f:
            out.append((name, f.read()))
    return out


def messages(path):
    return [data for _, data in maildir_files(path)]


def wait_messages(path, count, timeout=40):
    """Wait until a Maildir's new/ holds at least `count` messages."""
    return wait_for(lambda: len(messages(path)) >= count and messages(path), timeout,
                    what=f"{count} message(s) in {path}/new")


def queue_empty(inst):
    return inst.cmd("mailq").stdout == "Mail queue is empty\n"


def wait_queue_empty(inst, timeout=40):
    wait_for(lambda: queue_empty(inst), timeout, interval=0.3, what="an empty mail queue")


def header_block(data):
    """The header lines of a delivered message, unfolded, as (name, value)."""
    head = data.split(b"\n\n", 1)[0].decode("utf-8", "replace")
    fields = []
    for line in head.split("\n"):
        if line[:1] in (" ", "\t") and fields:
            fields[-1] = (fields[-1][0], fields[-1][1] + " " + line.strip())
        else:
            name, _, value = line.partition(":")
            fields.append((name.strip().lower(), value.strip()))
    return fields


def subject(data):
    return dict(header_block(data)).get("subject")


def deliveries(inst):
    """Every delivery line of local in the log, as dicts."""
    keys = ("pid", "qid", "to", "orig_to", "delay", "a", "b", "c", "d", "dsn", "status",
            "reason")
    return [dict(zip(keys, m.groups())) for m in DELIVERY_RE.finditer(inst.log())]


def strip_received(data, qid=None):
    """Split a delivered message into (prefix lines before Received, the
    Received header, the rest).  The Received header cleanup adds for a
    local submission is two lines: "Received: by HOST (pymta, from userid
    N)" and "\\tid QID; DATE"."""
    lines = data.split(b"\n")
    i = next(n for n, line in enumerate(lines) if line.startswith(b"Received: "))
    j = i + 1
    while lines[j][:1] in (b" ", b"\t"):
        j += 1
    received = b"\n".join(lines[i:j]) + b"\n"
    if qid is not None:
        assert f"\tid {qid}; ".encode() in received, received
    return b"\n".join(lines[:i]) + b"\n", received, b"\n".join(lines[j:])


def append_aliases(inst, text, replace=None):
    path = os.path.join(inst.etc, "aliases")
    with open(path) as f:
        current = f.read()
    if replace:
        old, new = replace
        assert old in current
        current = current.replace(old, new)
    with open(path, "w") as f:
        f.write(current + text)
    inst.cmd("newaliases")


def open_dir(inst, name):
    """A directory under the instance that default_privs (nobody) may
    write to: the instance top is root's 0755."""
    path = inst.path(name)
    os.makedirs(path, exist_ok=True)
    os.chmod(path, 0o1777)
    return path


# -- 1. sendmail to a virtual user -----------------------------------------------------------

MESSAGE = (b"From: Bob <bob@test.example>\n"
           b"To: Alice <alice@test.example>\n"
           b"Subject: spine end to end\n"
           b"Date: Mon, 20 Nov 2023 10:00:00 +0000\n"
           b"Message-Id: <spine-1@test.example>\n"
           b"MIME-Version: 1.0\n"
           b"Content-Type: text/plain; charset=utf-8\n"
           b"Content-Transfer-Encoding: 8bit\n"
           b"\n"
           b"first line\n"
           b".\n"
           b"..two dots stay two dots\n"
           b"From the start of a line\n"
           b"trailing blanks   \t\n"
           b"\n"
           b"\t tab and space\n"
           b"\xc3\xa9t\xc3\xa9 8-bit \xe2\x82\xac\n"
           + b"x" * 990 + b"\n"
           b"last line\n")


def test_sendmail_delivers_one_byte_exact_file_and_logs_status_sent(started):
    inst = started
    add_users(inst, "alice")
    # -oi: a line of a single dot is content, not the end of input.
    p = sendmail(inst, "-v", "-oi", "-f", "bob@test.example", f"alice@{inst.domain}",
                 input=MESSAGE)
    qid = queued_id(p)
    alice = box(inst, "alice")
    wait_messages(alice, 1)
    inst.wait_log(f"{qid}: removed", timeout=30)
    [(name, data)] = maildir_files(alice)
    assert maildir_files(alice, "tmp") == [] and maildir_files(alice, "cur") == []
    # Return-Path and Delivered-To from local, Received from cleanup, then
    # the message exactly as it was given (it has From, Date and
    # Message-Id, so cleanup adds nothing else).
    prefix, received, rest = strip_received(data, qid)
    assert prefix == b"Return-Path: <bob@test.example>\nDelivered-To: alice@test.example\n"
    assert received.startswith(b"Received: by mx.test.example (pymta, from userid 0)\n\tid ")
    assert rest == MESSAGE
    assert f",S={len(data)}" in name
    log = inst.log()
    assert re.search(rf"pymta/qmgr\[\d+\]: {qid}: from=<bob@test.example>, size=\d+, "
                     r"nrcpt=1 \(queue active\)", log)
    [line] = [d for d in deliveries(inst) if d["qid"] == qid]
    assert (line["to"], line["dsn"], line["status"], line["reason"]) == (
        "alice@test.example", "2.0.0", "sent", "delivered to maildir")
    assert re.search(rf"{qid}: to=<alice@test.example>, relay=local, delay=[0-9.]+, "
                     r"delays=[0-9.]+/[0-9.]+/[0-9.]+/[0-9.]+, dsn=2.0.0, status=sent "
                     r"\(delivered to maildir\)", log)
    assert queue_empty(inst)


# -- 2. master down: maildrop, then start -------------------------------------------------

def test_master_down_sendmail_exits_0_and_mail_arrives_after_start(instance):
    inst = instance
    add_users(inst, "alice")
    assert not inst.master_pid()
    p = sendmail(inst, f"alice@{inst.domain}", input=b"Subject: while down\n\nwaiting\n",
                 check=False)
    assert p.returncode == 0, p.stderr
    drop = inst.path("spool", "maildrop")
    assert len([n for n in os.listdir(drop) if not n.startswith(".")]) == 1
    alice = box(inst, "alice")
    assert messages(alice) == []
    inst.start()
    [data] = wait_messages(alice, 1)
    assert subject(data) == "while down"
    assert data.endswith(b"\n\nwaiting\n")
    wait_queue_empty(inst)
    assert os.listdir(drop) == []
    assert len(messages(alice)) == 1
    assert [d["status"] for d in deliveries(inst)] == ["sent"]


# -- 3. sendmail -t ---------------------------------------------------------------------------

def test_t_delivers_to_to_cc_and_bcc_and_no_bcc_header_remains(started):
    inst = started
    names = ("ann", "bob", "carol", "dave", "erin")
    add_users(inst, *names)
    msg = (b"From: Sender <sender@test.example>\n"
           b"To: Ann <ann@test.example>, bob@test.example\n"
           b"Cc: \"Carol, C.\" <carol@test.example>\n"
           b"Bcc: dave@test.example,\n"
           b"\tErin <erin@test.example>\n"
           b"Subject: minus t\n"
           b"\n"
           b"Bcc: this line is body, it stays\n")
    sendmail(inst, "-t", input=msg)
    for name in names:
        wait_messages(box(inst, name), 1)
    wait_queue_empty(inst)
    for name in names:
        [data] = messages(box(inst, name))
        fields = header_block(data)
        assert ("delivered-to", f"{name}@test.example") in fields
        assert not [f for f in fields if f[0] in ("bcc", "resent-bcc")], (name, fields)
        others = " ".join(v for n, v in fields if n not in ("delivered-to", "return-path"))
        assert "dave" not in others and "erin" not in others.lower(), (name, others)
        assert data.endswith(b"\n\nBcc: this line is body, it stays\n")
        assert ("cc", "\"Carol, C.\" <carol@test.example>") in fields


# -- 4. aliases, |command, :include:, .forward ---------------------------------------------

@pytest.fixture
def system_user(instance):
    """A system user made with useradd, its home under the instance;
    removed with userdel -r afterwards."""
    name = f"e2e{os.getpid() % 1000:03d}{random.randrange(10 ** 6):06d}"
    homes = instance.path("home")
    os.makedirs(homes, exist_ok=True)
    os.chmod(homes, 0o755)
    home = os.path.join(homes, name)
    run(["useradd", "-m", "-d", home, "-s", "/bin/sh", name])
    try:
        yield pwd.getpwnam(name)
    finally:
        p = run(["userdel", "-r", name], check=False)
        with pytest.raises(KeyError):
            pwd.getpwnam(name)
        assert not os.path.exists(home), p.stderr


def test_aliases_command_include_and_dot_forward(instance, system_user):
    inst = instance
    pw = system_user
    add_users(inst, "alice", "bob", "carol", "dave")
    out = open_dir(inst, "out")
    lists = inst.path("lists")
    os.makedirs(lists)
    with open(os.path.join(lists, "team"), "w") as f:
        f.write("# the include list\nalice@test.example,\n  carol@test.example\n")
    append_aliases(inst, (
        "team: alice@test.example, bob@test.example\n"
        f"cmd: \"|/usr/bin/tee {out}/cmd.out\"\n"
        f"inc: :include:{lists}/team\n"))
    forward = os.path.join(pw.pw_dir, ".forward")
    with open(forward, "w") as f:
        f.write(f"dave@test.example, \\{pw.pw_name}\n")
    os.chown(forward, pw.pw_uid, pw.pw_gid)
    inst.start()

    ids = {}
    for target in ("team", "cmd", "inc", pw.pw_name):
        msg = f"From: s@test.example\nSubject: to {target}\n\nfor {target}\n".encode()
        # An unqualified recipient gets @$myorigin (mx.test.example, in
        # mydestination: aliases and system users).
        p = sendmail(inst, "-v", "-f", "s@test.example", target, input=msg)
        ids[target] = queued_id(p)

    want = {"alice": ["to inc", "to team"], "bob": ["to team"], "carol": ["to inc"],
            "dave": [f"to {pw.pw_name}"]}
    for user, subjects in want.items():
        wait_messages(box(inst, user), len(subjects))
    home_box = os.path.join(pw.pw_dir, "Maildir")
    wait_messages(home_box, 1)
    cmd_out = os.path.join(out, "cmd.out")
    wait_for(lambda: os.path.exists(cmd_out) and os.path.getsize(cmd_out) > 0, 30,
             what="the command's output file")
    wait_queue_empty(inst)

    for user, subjects in want.items():
        got = messages(box(inst, user))
        assert sorted(subject(d) for d in got) == subjects, user
        for data in got:
            target = subject(data)[3:]
            address = f"{target}@mx.test.example"
            assert data.startswith(f"Return-Path: <s@test.example>\nDelivered-To: "
                                   f"{address}\n".encode()), data[:200]
            assert data.endswith(f"\n\nfor {target}\n".encode())

    # The command ran as default_privs (etc/aliases is root's) and got a
    # From_ line, Return-Path, Delivered-To and the message on stdin.
    with open(cmd_out, "rb") as f:
        piped = f.read()
    assert os.stat(cmd_out).st_uid == pwd.getpwnam("nobody").pw_uid
    from_line, rest = piped.split(b"\n", 1)
    assert from_line.startswith(b"From s@test.example  ")
    prefix, received, body = strip_received(rest, ids["cmd"])
    assert prefix == b"Return-Path: <s@test.example>\nDelivered-To: cmd@mx.test.example\n"
    assert body.startswith(b"From: s@test.example\nSubject: to cmd\n")
    assert body.endswith(b"\n\nfor cmd\n")

    # .forward: a copy to dave, and \user keeps one in the home Maildir,
    # written as the user.
    [(name, data)] = maildir_files(home_box)
    assert subject(data) == f"to {pw.pw_name}"
    assert data.startswith(f"Return-Path: <s@test.example>\nDelivered-To: "
                           f"{pw.pw_name}@mx.test.example\n".encode())
    assert os.stat(os.path.join(home_box, "new", name)).st_uid == pw.pw_uid

    log = inst.log()
    for user in ("alice", "bob"):
        assert f"{ids['team']}: to=<{user}@test.example>, orig_to=<team@mx.test.example>" in log
    assert f"status=sent (delivered to command: /usr/bin/tee {cmd_out})" in log
    assert f"{ids['inc']}: to=<carol@test.example>, orig_to=<inc@mx.test.example>" in log
    assert (f"{ids[pw.pw_name]}: to=<dave@test.example>, "
            f"orig_to=<{pw.pw_name}@mx.test.example>") in log
    assert not [d for d in deliveries(inst) if d["status"] != "sent"]


# -- 5. bounces -----------------------------------------------------------------------------

def single_report(data):
    """Parse a DSN delivered to a Maildir: checked with the email package
    and with pymta.core.dsn.parse_dsn."""
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in msg.get_payload()][:2] == [
        "text/plain", "message/delivery-status"]
    return parse_dsn(data)


def test_unknown_user_gets_the_sender_a_dsn(started):
    inst = started
    add_users(inst, "alice", "bob")
    msg = b"From: alice@test.example\nSubject: who is there\n\nhello?\n"
    p = sendmail(inst, "-v", "-f", f"alice@{inst.domain}", f"bob@{inst.domain}",
                 f"nosuch@{inst.domain}", input=msg)
    qid = queued_id(p)
    [data] = wait_messages(box(inst, "alice"), 1)
    wait_queue_empty(inst)
    assert len(messages(box(inst, "bob"))) == 1
    assert len(messages(box(inst, "alice"))) == 1
    # The null sender, so that the DSN itself can never be bounced back.
    assert data.startswith(b"Return-Path: <>\nDelivered-To: alice@test.example\n")
    report = single_report(data)
    [rcpt] = report.recipients
    assert rcpt["final-recipient"].replace(" ", "").lower() == "rfc822;nosuch@test.example"
    assert rcpt["action"] == "failed"
    assert rcpt["status"] == "5.1.1"
    assert b"Subject: who is there" in report.returned
    log = inst.log()
    assert re.search(rf"{qid}: to=<nosuch@test.example>, relay=local, .*dsn=5\.1\.1, "
                     r"status=bounced", log)
    m = re.search(rf"{qid}: sender non-delivery notification: (\w+)", log)
    assert m
    assert [d["to"] for d in deliveries(inst) if d["qid"] == m.group(1)] == [
        "alice@test.example"]


def test_undeliverable_bounce_goes_to_postmaster_and_never_loops(instance):
    inst = instance
    add_users(inst, "pm")
    append_aliases(inst, "", replace=("postmaster: root\n", "postmaster: pm@test.example\n"))
    inst.start()
    # The sender is unknown too: its bounce cannot be delivered.
    p = sendmail(inst, "-v", "-f", "ghost@test.example", "nosuch@test.example",
                 input=b"Subject: nobody home\n\nx\n")
    qid = queued_id(p)
    [data] = wait_messages(box(inst, "pm"), 1)
    wait_queue_empty(inst)
    log = inst.log()
    bounce = re.search(rf"{qid}: sender non-delivery notification: (\w+)", log).group(1)
    copy = re.search(rf"{bounce}: postmaster non-delivery notification: (\w+)", log).group(1)
    assert data.startswith(b"Return-Path: <double-bounce@mx.test.example>\n"
                           b"Delivered-To: postmaster@mx.test.example\n")
    report = single_report(data)
    [rcpt] = report.recipients
    assert rcpt["final-recipient"].replace(" ", "").lower() == "rfc822;ghost@test.example"
    assert (rcpt["action"], rcpt["status"]) == ("failed", "5.1.1")
    assert [d["to"] for d in deliveries(inst) if d["qid"] == copy] == ["pm@test.example"]

    # Postmaster unreachable as well: the copy is dropped, nothing loops.
    append_aliases(inst, "", replace=("postmaster: pm@test.example\n",
                                      "postmaster: gone@test.example\n"))
    p = sendmail(inst, "-v", "-f", "ghost2@test.example", "nosuch2@test.example",
                 input=b"Subject: nobody home either\n\nx\n")
    qid2 = queued_id(p)
    inst.wait_log("undeliverable postmaster notification discarded", timeout=40)
    wait_queue_empty(inst)
    time.sleep(2)
    assert queue_empty(inst)
    log = inst.log()
    assert len(re.findall(r"non-delivery notification", log)) == 4
    assert len(re.findall(rf"{qid2}: sender non-delivery notification", log)) == 1
    assert len(messages(box(inst, "pm"))) == 1


def test_alias_loop_bounces_once(instance):
    inst = instance
    add_users(inst, "alice")
    append_aliases(inst, "loopa: loopb\nloopb: loopa\n")
    inst.start()
    p = sendmail(inst, "-v", "-f", f"alice@{inst.domain}", "loopa",
                 input=b"Subject: round and round\n\nx\n")
    qid = queued_id(p)
    [data] = wait_messages(box(inst, "alice"), 1)
    wait_queue_empty(inst)
    time.sleep(2)
    assert queue_empty(inst)
    assert len(messages(box(inst, "alice"))) == 1
    report = single_report(data)
    [rcpt] = report.recipients
    assert rcpt["final-recipient"].replace(" ", "").lower() == "rfc822;loopa@mx.test.example"
    assert (rcpt["action"], rcpt["status"]) == ("failed", "5.4.6")
    bounced = [d for d in deliveries(inst) if d["status"] == "bounced"]
    assert [(d["qid"], d["dsn"]) for d in bounced] == [(qid, "5.4.6")]
    assert "alias database loop" in bounced[0]["reason"]
    assert len(re.findall(r"non-delivery notification", inst.log())) == 1


# -- 6. kill -9 of qmgr and local during a burst -------------------------------------------

BURST = 500
SENDERS = 5
KILLS_EACH = 3


def pids_of(inst, program):
    return [pid for pid, title in inst.process_titles().items()
            if title.startswith(f"pymta: {program} ")]


def age(pid):
    """Seconds since the process started (from /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def may_kill(inst, program, pid):
    """True once the master cannot take the death of `pid` for a bad
    start-up (it throttles a service whose process dies within 5 s without
    having served a client).  local has served qmgr once it logged a
    delivery; qmgr serves the triggers cleanup sends for every message, so
    during the burst one that has logged work and lived a second has had
    its first client."""
    try:
        seconds = age(pid)
    except (FileNotFoundError, ProcessLookupError):
        return False
    if seconds > 6:
        return True
    worked = f"pymta/{program}[{pid}]: " in inst.log()
    if program == "local":
        return worked
    return worked and seconds > 1.5


def header_ids(data):
    m = re.search(rb"^X-E2E-Id: (\d+)$", data.split(b"\n\n", 1)[0], re.M)
    assert m, data[:300]
    return int(m.group(1))


@pytest.mark.timeout(200)
def test_kill_9_of_qmgr_and_local_during_a_burst_loses_nothing(started):
    inst = started
    add_users(inst, "alice")
    alice = box(inst, "alice")
    seed = random.randrange(1 << 30)
    rnd = random.Random(seed)
    print(f"random seed {seed}")
    started_at = time.monotonic()
    sent = set()
    errors = []
    lock = threading.Lock()

    def sender(k):
        todo = list(range(k, BURST, SENDERS))
        s = None
        tries = 0
        while todo:
            n = todo[0]
            msg = (f"From: burst@example.org\nTo: alice@{inst.domain}\nSubject: burst {n}\n"
                   f"X-E2E-Id: {n}\n\nmessage {n}\n").encode()
            try:
                if s is None:
                    s = smtplib.SMTP("127.0.0.1", inst.ports["smtp"], timeout=60)
                s.sendmail("burst@example.org", [f"alice@{inst.domain}"], msg)
            except (smtplib.SMTPException, OSError) as e:
                # smtpd is not killed; a failure would be a bug, but an
                # unacknowledged message may be sent again.
                tries += 1
                with lock:
                    errors.append(f"{n}: {e!r}")
                if s is not None:
                    s.close()
                s = None
                if tries > 20:
                    return
                time.sleep(0.2)
                continue
            with lock:
                sent.add(n)
            todo.pop(0)
            # A light pace, so that the burst lasts long enough for
            # several kills at random moments while mail flows.
            time.sleep(rnd.uniform(0.0, 0.12))
        s.quit()

    threads = [threading.Thread(target=sender, args=(k,), daemon=True) for k in range(SENDERS)]
    for t in threads:
        t.start()

    # The killer: qmgr and local in a random order (each pair has one of
    # both), each victim once it may die without throttling its service,
    # after a random pause, while the senders are busy.
    killed = []
    victims = []
    for _ in range(KILLS_EACH):
        victims += rnd.sample(["qmgr", "local"], 2)
    for program in victims:
        if not any(t.is_alive() for t in threads):
            break
        deadline = time.monotonic() + 20
        pid = None
        while time.monotonic() < deadline and any(t.is_alive() for t in threads):
            ready = [p for p in pids_of(inst, program) if may_kill(inst, program, p)]
            if ready:
                pid = rnd.choice(ready)
                break
            time.sleep(0.05)
        if pid is None:
            continue
        time.sleep(rnd.uniform(0.1, 1.2))
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        killed.append((program, pid, round(time.monotonic() - started_at, 2), len(sent)))
    for t in threads:
        t.join(timeout=100)
    burst_time = time.monotonic() - started_at
    assert not any(t.is_alive() for t in threads), "senders did not finish"
    assert sent == set(range(BURST)), (len(sent), errors[:5])
    print(f"burst of {BURST} over SMTP in {burst_time:.1f}s; kills (program, pid, t, sent): "
          f"{killed}")
    assert {p for p, *_ in killed} == {"qmgr", "local"}, killed
    for _, pid, *_ in killed:
        inst.wait_log(f"pid {pid} killed by signal 9")
    dead = {pid for _, pid, *_ in killed}
    wait_for(lambda: set(pids_of(inst, "qmgr")) - dead, timeout=20, what="a new qmgr")

    # Requests in flight when local died were deferred (as Postfix does);
    # a flush brings them back at once instead of after the backoff time.
    def drained():
        if queue_empty(inst):
            return True
        inst.cmd("postqueue", "-f")
        return False

    wait_for(drained, timeout=100, interval=2.0, what="the queue to drain")
    assert queue_empty(inst)
    copies = {}
    for data in messages(alice):
        n = header_ids(data)
        copies[n] = copies.get(n, 0) + 1
    missing = sorted(set(range(BURST)) - set(copies))
    assert not missing, f"lost {len(missing)}: {missing[:20]}"
    duplicates = sum(c - 1 for c in copies.values())
    twice = sorted(n for n, c in copies.items() if c > 1)
    print(f"{duplicates} duplicate(s) after {len(killed)} kill(s): {twice}; "
          f"{len(errors)} SMTP error(s); total {time.monotonic() - started_at:.1f}s")
    # A duplicate only for a delivery made but not yet recorded when a
    # process died (docs/queue.md, crash windows): at most one per message
    # per kill, and per kill no more than the deliveries that can be in
    # flight at once, local_destination_concurrency_limit (one domain).
    in_flight = int(inst.cmd("postconf", "-h", "local_destination_concurrency_limit")
                    .stdout.strip())
    assert max(copies.values()) <= 1 + len(killed)
    assert duplicates <= len(killed) * in_flight, (duplicates, killed)
    assert os.listdir(inst.path("spool", "corrupt")) == []
    assert not errors, errors[:5]
    assert "bad command startup" not in inst.log()


# -- 7. delay= and delays= ----------------------------------------------------------------

def half_step(printed):
    """Half the resolution of a time value as format_tv prints it: two
    significant digits, at most 2 decimals, whole seconds from 10 s."""
    v = float(printed)
    if v < 1:
        return 0.005
    if v < 10:
        return 0.05
    return 0.5


def check_delays(d):
    delay = float(d["delay"])
    parts = [float(d[k]) for k in "abcd"]
    slack = half_step(d["delay"]) + sum(half_step(d[k]) for k in "abcd") + 1e-9
    assert abs(delay - sum(parts)) <= slack, d
    assert delay + slack >= sum(parts), d


def test_delay_is_the_sum_of_delays(instance):
    inst = instance
    add_users(inst, "alice")
    # One message waits in maildrop/ while the master is down: its time
    # before the active queue (delays "a") counts from the posting.
    sendmail(inst, f"alice@{inst.domain}", input=b"Subject: early\n\nx\n")
    time.sleep(2.0)
    inst.start()
    wait_messages(box(inst, "alice"), 1)
    p = sendmail(inst, "-v", f"alice@{inst.domain}", input=b"Subject: late\n\nx\n")
    late = queued_id(p)
    wait_messages(box(inst, "alice"), 2)
    wait_queue_empty(inst)
    lines = deliveries(inst)
    assert len(lines) == 2
    for d in lines:
        assert d["status"] == "sent"
        check_delays(d)
    [first] = [d for d in lines if d["qid"] != late]
    assert float(first["delay"]) >= 1.9 and float(first["a"]) >= 1.9, first
    [second] = [d for d in lines if d["qid"] == late]
    assert float(second["delay"]) < 30
