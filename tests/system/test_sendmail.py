"""sendmail and pickup, run for real: a `pymta init` instance whose
master.cf has only the pickup service, so the queue files that appear in
spool/incoming are checked with the Queue API (no qmgr takes them)."""

import os
import pwd
import re
import socket
import subprocess

import pytest

from pymta.core.queue import Queue
from pymta.core.queue_id import new_queue_id
from tests.conftest import BIN, run, wait_for

PICKUP_ONLY = "pickup unix n - n 60 1 pickup\n"


@pytest.fixture
def inst(instance):
    instance.write_master_cf(PICKUP_ONLY)
    instance.queue = Queue(instance.path("spool"))
    return instance


def sendmail(inst, *args, input=b"", check=True):
    return run([os.path.join(BIN, "sendmail"), "-c", inst.etc, *args], input=input, check=check)


def queued_id(p):
    m = re.search(r"queued as (\w+)", p.stderr)
    assert m, p.stderr
    return m.group(1)


def _login():
    return pwd.getpwuid(os.getuid()).pw_name


def incoming(inst):
    return sorted(inst.queue.scan("incoming"))


def maildrop(inst):
    return sorted(inst.queue.scan("maildrop"))


def read(inst, qid):
    with inst.queue.open("incoming", qid, readonly=True) as f:
        return f, f.read_content()


MSG = b"Subject: test\nTo: alice@test.example\n\nline one\n..dots stay\n\xe9 8-bit\n"


def test_sendmail_goes_through_pickup_and_is_queued_on_exit(inst):
    inst.start()
    p = sendmail(inst, "-v", "alice@test.example", "Bob <bob@test.example>", input=MSG)
    qid = queued_id(p)
    # pickup answers only once the file is committed: it is there already.
    assert incoming(inst) == [qid]
    assert maildrop(inst) == []
    f, data = read(inst, qid)
    assert f.sender == f"{_login()}@mx.test.example"
    assert [r.address for r in f.recipients] == ["alice@test.example", "bob@test.example"]
    head, body = data.split(b"\n\n", 1)
    assert body == b"line one\n..dots stay\n\xe9 8-bit\n"
    lines = head.decode().split("\n")
    assert lines[0] == f"Received: by mx.test.example (pymta, from userid {os.getuid()})"
    assert lines[1].startswith(f"\tid {qid}; ")
    assert lines[2:4] == ["Subject: test", "To: alice@test.example"]
    assert any(line.startswith("Message-Id: <") for line in lines)
    assert any(line.startswith("Date: ") for line in lines)
    log = inst.log()
    assert re.search(rf"pymta/pickup\[\d+\]: {qid}: uid={os.getuid()} from=<{_login()}>", log)
    assert re.search(rf"pymta/pickup\[\d+\]: {qid}: message-id=<\d+\.{qid}@mx.test.example>", log)


def test_master_down_leaves_a_maildrop_file_picked_up_at_start(inst):
    p = sendmail(inst, "-v", "alice@test.example", input=b"Subject: while down\r\n\r\nbody\r\n")
    name = queued_id(p)
    assert maildrop(inst) == [name]
    assert incoming(inst) == []
    st = os.stat(os.path.join(inst.path("spool", "maildrop"), name))
    assert st.st_uid == os.getuid()
    inst.start()
    wait_for(lambda: incoming(inst), timeout=30, what="the maildrop message in incoming/")
    wait_for(lambda: maildrop(inst) == [], timeout=30, what="maildrop/ to be emptied")
    [qid] = incoming(inst)
    f, data = read(inst, qid)
    assert [r.address for r in f.recipients] == ["alice@test.example"]
    assert data.split(b"\n\n", 1)[1] == b"body\n"
    assert f"{qid}: uid={os.getuid()} from=<{_login()}>" in inst.log()


def test_t_takes_to_cc_bcc_and_removes_bcc(inst):
    inst.start()
    msg = (b"From: Sender <s@test.example>\r\nTo: Ann <ann@test.example>, bob@test.example\r\n"
           b"Cc: \"Carol, C\" <carol@test.example>\r\nBcc: dave@test.example,\r\n\terin@test.example\r\n"
           b"Subject: t\r\n\r\nTo: not@test.example\r\n")
    p = sendmail(inst, "-v", "-t", "extra@test.example", input=msg)
    f, data = read(inst, queued_id(p))
    assert [r.address for r in f.recipients] == [
        "extra@test.example", "ann@test.example", "bob@test.example", "carol@test.example",
        "dave@test.example", "erin@test.example"]
    assert b"Bcc" not in data and b"dave" not in data and b"erin" not in data
    assert b"\nCc: \"Carol, C\" <carol@test.example>\nSubject: t\n" in data
    assert data.endswith(b"\n\nTo: not@test.example\n")


def test_t_uses_resent_headers_when_present(inst):
    inst.start()
    msg = b"To: old@test.example\nResent-To: new@test.example\nResent-Bcc: hidden@test.example\n\nx\n"
    f, data = read(inst, queued_id(sendmail(inst, "-v", "-t", input=msg)))
    assert [r.address for r in f.recipients] == ["new@test.example", "hidden@test.example"]
    assert b"hidden" not in data


def test_sender_and_full_name_options(inst):
    inst.start()
    f, data = read(inst, queued_id(sendmail(inst, "-v", "-f", "boss@test.example", "-F", "The Boss",
                                            "a@test.example", input=b"Subject: s\n\nx\n")))
    assert f.sender == "boss@test.example"
    assert b"\nFrom: The Boss <boss@test.example>\n" in data
    f, data = read(inst, queued_id(sendmail(inst, "-v", "-rother@test.example", "a@test.example",
                                            input=b"From: me@test.example\n\nx\n")))
    assert f.sender == "other@test.example"
    assert data.count(b"From:") == 1
    f, _ = read(inst, queued_id(sendmail(inst, "-v", "-f", "<>", "a@test.example", input=b"\n")))
    assert f.sender == ""


def test_dsn_options_are_recorded(inst):
    inst.start()
    f, _ = read(inst, queued_id(sendmail(inst, "-v", "-N", "success,failure", "-R", "hdrs",
                                         "-V", "envid-1", "-B", "8BITMIME", "-oi", "-om",
                                         "a@test.example", input=b"x\n")))
    assert f.recipients[0].notify == "SUCCESS,FAILURE"
    assert (f.attrs["ret"], f.attrs["envid"], f.attrs["body_type"]) == ("HDRS", "envid-1", "8BITMIME")


def test_dot_ends_input_unless_i(inst):
    inst.start()
    msg = b"Subject: d\n\nbefore\n.\nafter\n"
    _, data = read(inst, queued_id(sendmail(inst, "-v", "a@test.example", input=msg)))
    assert data.endswith(b"\n\nbefore\n")
    _, data = read(inst, queued_id(sendmail(inst, "-v", "-i", "a@test.example", input=msg)))
    assert data.endswith(b"\n\nbefore\n.\nafter\n")


def test_bs_runs_an_smtp_session(inst):
    inst.start()
    session = (b"EHLO client\r\nMAIL FROM:<s@test.example> RET=HDRS\r\n"
               b"RCPT TO:<a@test.example> NOTIFY=FAILURE\nRCPT TO:<postmaster>\r\nDATA\r\n"
               b"Subject: bs\r\n\r\n..stuffed\r\n.\r\nQUIT\r\n")
    p = sendmail(inst, "-bs", input=session)
    replies = p.stdout.split("\r\n")
    assert replies[0] == "220 mx.test.example ESMTP pymta"
    m = re.search(r"250 2\.0\.0 Ok: queued as (\w+)", p.stdout)
    assert m and replies[-2] == "221 2.0.0 Bye"
    f, data = read(inst, m.group(1))
    assert f.sender == "s@test.example"
    assert [(r.address, r.notify) for r in f.recipients] == [
        ("a@test.example", "FAILURE"), ("postmaster@mx.test.example", None)]
    assert f.attrs["ret"] == "HDRS"
    assert data.endswith(b"\n\n.stuffed\n")


def test_hostile_maildrop_files_go_to_corrupt(inst):
    drop = inst.path("spool", "maildrop")
    good = queued_id(sendmail(inst, "-v", "a@test.example", input=b"Subject: good\n\nx\n"))
    junk = new_queue_id()
    with open(os.path.join(drop, junk), "wb") as f:
        f.write(b"this is not a queue file\n")
    link = new_queue_id()
    os.symlink("/etc/passwd", os.path.join(drop, link))
    # A real maildrop file with a record type that only the queue may hold.
    forged = new_queue_id()
    with open(os.path.join(drop, good), "rb") as f:
        data = f.read()
    with open(os.path.join(drop, forged), "wb") as f:
        f.write(data.replace(b"\nS", b"\nAclient_address=10.0.0.1\nS", 1))
    inst.start()
    wait_for(lambda: maildrop(inst) == [], timeout=30, what="maildrop/ to be emptied")
    assert len(incoming(inst)) == 1
    corrupt = inst.path("spool", "corrupt")
    for name in (junk, link, forged):
        assert os.path.lexists(os.path.join(corrupt, name)), name
        assert inst.queue.corrupt_reason(name).startswith("maildrop: ")
    assert os.path.islink(os.path.join(corrupt, link))
    log = inst.log()
    assert f"warning: maildrop/{junk}: " in log and "moved to corrupt/" in log
    assert "attribute 'client_address' not allowed" in inst.queue.corrupt_reason(forged)


def test_refused_maildrop_message_is_bounced_to_its_sender(inst):
    hops = b"Received: by x\n" * 60 + b"Subject: loop\n\nbody\n"
    name = queued_id(sendmail(inst, "-v", "-f", "s@test.example", "a@test.example", input=hops))
    inst.start()
    wait_for(lambda: maildrop(inst) == [], timeout=30, what="maildrop/ to be emptied")
    [qid] = incoming(inst)
    f, data = read(inst, qid)
    assert f.sender == ""
    assert [r.address for r in f.recipients] == ["s@test.example"]
    assert b"multipart/report" in data and b"5.4.0" in data
    log = inst.log()
    assert f"{name}: reject: uid={os.getuid()} from=<s@test.example>: 5.4.0 too many hops" in log
    assert f"{name}: sender non-delivery notification: {qid}" in log


def test_refusal_through_pickup_is_reported_with_ex_unavailable(inst):
    inst.start()
    hops = b"Received: by x\n" * 60 + b"\nbody\n"
    p = sendmail(inst, "a@test.example", input=hops, check=False)
    assert p.returncode == 69
    assert "5.4.0 too many hops" in p.stderr
    assert incoming(inst) == [] and maildrop(inst) == []


@pytest.mark.parametrize("args,stdin,status,text", [
    (["-Z", "a@test.example"], b"x\n", 64, "invalid option -- 'Z'"),
    ([], b"x\n", 64, "Recipient addresses must be specified"),
    (["-t"], b"Subject: none\n\nx\n", 64, "No recipient addresses found in message header"),
    (["-bv", "a@test.example"], b"", 64, "unsupported: -bv"),
    (["-n", "a@test.example"], b"", 64, "-n option not supported"),
    (["-R", "some", "a@test.example"], b"", 64, "bad -R option value"),
    (["-B", "9BIT", "a@test.example"], b"", 64, "-B option needs 8BITMIME or 7BIT"),
    (["-bp", "a@test.example"], b"", 64, "display queue mode requires no recipient"),
    (["-f"], b"", 64, "option requires an argument -- 'f'"),
    (["a@@test.example"], b"x\n", 65, "bad recipient address syntax"),
    (["-f", "a@b@c", "a@test.example"], b"x\n", 65, "bad sender address syntax"),
])
def test_exit_codes(inst, args, stdin, status, text):
    p = sendmail(inst, *args, input=stdin, check=False)
    assert p.returncode == status, p.stderr
    assert text in p.stderr
    assert p.stderr.startswith("sendmail: fatal: ")
    assert maildrop(inst) == [] and incoming(inst) == []


def test_message_size_limit(inst):
    inst.postconf_e(message_size_limit=1000)
    p = sendmail(inst, "a@test.example", input=b"x" * 1001, check=False)
    assert p.returncode == 65 and "message file too big" in p.stderr
    assert maildrop(inst) == []
    sendmail(inst, "a@test.example", input=b"x" * 1000)
    assert len(maildrop(inst)) == 1


def test_ignored_options_and_queue_interval(inst):
    assert sendmail(inst, "-q30m").returncode == 0
    assert sendmail(inst, "-bh").returncode == 0
    sendmail(inst, "-oem", "-odb", "-G", "-U", "-x", "-m", "-L", "lbl", "-h", "5",
             "a@test.example", input=b"x\n")
    assert len(maildrop(inst)) == 1


def test_bp_and_bi_run_postqueue_and_newaliases(inst):
    name = queued_id(sendmail(inst, "-v", "a@test.example", input=b"x\n"))
    inst.start()
    wait_for(lambda: incoming(inst), timeout=30, what="message in incoming/")
    p = sendmail(inst, "-bp")
    assert incoming(inst)[0] in p.stdout and name not in p.stdout
    p = sendmail(inst, "-bi")
    assert "nothing to build (texthash tables are read directly)" in p.stderr


def test_pickup_rejects_bad_requests(inst):
    inst.start()
    path = inst.path("run", "public", "pickup")

    def ask(data):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(path)
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            out += chunk
        s.close()
        return out

    assert b"status=permfail" in ask(b"request=submit\nsender=a\nsize=1\n\nx")
    assert b"reason=protocol error: no recipients" in ask(b"request=submit\nsender=a\nsize=1\n\nx")
    assert b"status=permfail\ndsn=5.3.4" in ask(
        b"request=submit\nsender=a\nrcpt=b@test.example\nsize=99999999999\n\n")
    # The uid is the peer's, whatever the request says.
    reply = ask(b"request=submit\nsender=a\nrcpt=b@test.example\nuid=12345\nsize=2\n\nx\n")
    qid = re.search(rb"queue_id=(\w+)", reply).group(1).decode()
    _, data = read(inst, qid)
    assert data.startswith(f"Received: by mx.test.example (pymta, from userid {os.getuid()})".encode())
    assert incoming(inst) == [qid]


def test_many_concurrent_submissions(inst):
    inst.start()
    procs = [subprocess.Popen([os.path.join(BIN, "sendmail"), "-c", inst.etc, "-v",
                               f"u{i}@test.example"], stdin=subprocess.PIPE,
                              stderr=subprocess.PIPE) for i in range(20)]
    ids = []
    for i, p in enumerate(procs):
        _, err = p.communicate(f"Subject: {i}\n\n{i}\n".encode(), timeout=60)
        assert p.returncode == 0, err
        ids.append(re.search(rb"queued as (\w+)", err).group(1).decode())
    assert sorted(ids) == incoming(inst)


def test_stale_socket_after_a_crash_falls_back_to_maildrop(inst):
    inst.start()
    wait_for(inst.children, timeout=30, what="the pickup process")
    inst.kill_all()
    wait_for(lambda: inst.master_pid() is None and not inst.children(), timeout=30, what="the kill")
    assert os.path.exists(inst.path("run", "public", "pickup"))
    name = queued_id(sendmail(inst, "-v", "a@test.example", input=b"Subject: crash\n\nx\n"))
    assert maildrop(inst) == [name]
    inst.start()
    wait_for(lambda: incoming(inst) and not maildrop(inst), timeout=30, what="pickup after restart")
