"""The queue commands on real instances: mailq / postqueue -p -j -f -i -s,
postsuper -d -h -H -r -s -p, postcat.  Most run against a stopped instance
whose queue is filled with the Queue API (the listing reads the queue
directly); flushing runs with qmgr and the fake delivery agent."""

import json
import os
import shutil
import time

import pytest

from pymta.core.queue_id import new_queue_id
from tests.conftest import wait_for
from tests.system.test_qmgr import BODY, Rig

HEADING = "----Queue ID----- --Size-- ---Arrival Time---- --Sender/Recipient------"
RCPT_INDENT = " " * 47


def asctime19(t):
    return time.asctime(time.localtime(t))[:19]


def first_line(qid, marker, size, arrival, sender):
    return "%-17s %8d %19.19s %s" % (qid + marker, size, asctime19(arrival), sender)


def reason_line(text):
    return " " * max(0, 76 - len(text)) + f"({text})"


@pytest.fixture
def rig(instance):
    return Rig(instance)


def populate(rig):
    """One message in each of incoming, active, deferred (with defer
    reasons) and hold; returns their ids and arrival times."""
    now = int(time.time()) - 60
    inc, act, dfr, hold = rig.inject(
        dict(sender="alice@test.example", rcpts=["a1@test.example"], content=BODY,
             arrival=now),
        dict(sender="", rcpts=["a2@test.example"], content=BODY, queue="active", arrival=now),
        dict(sender="bob@test.example",
             rcpts=["d1@remote.example", "d2@remote.example", "d3@test.example", "d4@x.example"],
             content=BODY, queue="deferred", arrival=now),
        dict(sender="carol@test.example", rcpts=["h1@test.example"], content=BODY,
             queue="hold", arrival=now))
    q = rig.queue
    q.append_log("defer", dfr, "d1@remote.example", "4.4.1", "deferred", "connection timed out")
    q.append_log("defer", dfr, "d2@remote.example", "4.4.1", "deferred", "connection timed out")
    q.append_log("defer", dfr, "d4@x.example", "4.3.0", "deferred", "mail system full")
    return {"incoming": inc, "active": act, "deferred": dfr, "hold": hold, "time": now}


# -- listing ----------------------------------------------------------------------------------------

def test_empty_queue(rig):
    p = rig.inst.cmd("mailq")
    assert p.stdout == "Mail queue is empty\n"
    assert rig.inst.cmd("postqueue", "-j").stdout == ""


def test_mailq_layout(rig):
    ids = populate(rig)
    out = rig.inst.cmd("mailq").stdout
    size = len(BODY)
    t = ids["time"]
    expected = "\n".join([
        HEADING,
        first_line(ids["incoming"], "", size, t, "alice@test.example"),
        RCPT_INDENT + "a1@test.example",
        "",
        first_line(ids["active"], "*", size, t, "MAILER-DAEMON"),
        RCPT_INDENT + "a2@test.example",
        "",
        first_line(ids["deferred"], "", size, t, "bob@test.example"),
        reason_line("connection timed out"),
        RCPT_INDENT + "d1@remote.example",
        RCPT_INDENT + "d2@remote.example",
        reason_line("mail system full"),
        RCPT_INDENT + "d4@x.example",
        reason_line("reason unavailable"),
        RCPT_INDENT + "d3@test.example",
        "",
        first_line(ids["hold"], "!", size, t, "carol@test.example"),
        RCPT_INDENT + "h1@test.example",
        "",
        f"-- {4 * size // 1024} Kbytes in 4 Requests.",
        ""])
    assert out == expected
    assert rig.inst.cmd("postqueue", "-p").stdout == out


def test_done_recipients_are_not_listed(rig):
    qid = rig.inject(dict(sender="a@test.example", rcpts=["x@test.example", "y@test.example"],
                          queue="deferred"))[0]
    with rig.queue.open("deferred", qid) as qf:
        qf.mark_done(0)
    out = rig.inst.cmd("mailq").stdout
    assert "y@test.example" in out and "x@test.example" not in out
    assert out.endswith(" in 1 Request.\n")


def test_postqueue_json(rig):
    ids = populate(rig)
    lines = rig.inst.cmd("postqueue", "-j").stdout.splitlines()
    objs = [json.loads(line) for line in lines]
    assert [o["queue_name"] for o in objs] == ["incoming", "active", "deferred", "hold"]
    d = objs[2]
    assert list(d) == ["queue_name", "queue_id", "arrival_time", "message_size",
                       "forced_expire", "sender", "recipients"]
    assert d["queue_id"] == ids["deferred"] and d["arrival_time"] == ids["time"]
    assert d["message_size"] == len(BODY) and d["forced_expire"] is False
    assert d["sender"] == "bob@test.example"
    assert d["recipients"] == [
        {"address": "d1@remote.example", "delay_reason": "connection timed out"},
        {"address": "d2@remote.example", "delay_reason": "connection timed out"},
        {"address": "d4@x.example", "delay_reason": "mail system full"},
        {"address": "d3@test.example"}]
    assert objs[1]["sender"] == ""
    # Postfix's spacing, byte for byte.
    assert lines[3].startswith('{"queue_name": "hold", "queue_id": "')


def test_listing_many_messages(rig):
    template = rig.inject(dict(sender="bulk@test.example", rcpts=["r@test.example"],
                               content=BODY, queue="deferred"))[0]
    with open(rig.queue.path("deferred", template), "rb") as f:
        data = f.read()
    count = 3000
    for i in range(count - 1):
        qid = new_queue_id(10_000_000 + i)
        with open(rig.queue.path("deferred", qid), "wb") as f:
            f.write(data)
    started = time.monotonic()
    out = rig.inst.cmd("mailq").stdout
    elapsed = time.monotonic() - started
    assert out.endswith(f"-- {count * len(BODY) // 1024} Kbytes in {count} Requests.\n")
    assert out.count("bulk@test.example") == count
    assert elapsed < 10


def test_usage_and_bad_options(rig):
    p = rig.inst.cmd("postqueue", check=False)
    assert p.returncode == 64
    assert p.stderr.startswith("postqueue: fatal: usage: postqueue -f | postqueue -i queueid")
    p = rig.inst.cmd("postqueue", "-p", "-f", check=False)
    assert p.returncode == 64
    p = rig.inst.cmd("postqueue", "-i", "../etc", check=False)
    assert p.returncode == 64 and 'Cannot flush queue ID - invalid name: "../etc"' in p.stderr


def test_flush_when_the_mail_system_is_down(rig):
    p = rig.inst.cmd("postqueue", "-f", check=False)
    assert p.returncode == 69
    assert p.stderr == "postqueue: fatal: Cannot flush mail queue - mail system is down\n"


# -- flushing with qmgr ------------------------------------------------------------------------------------

def test_flush_one_message_and_one_site(rig):
    later = time.time() + 3600
    one, site_a, site_b, other = rig.inject(
        dict(sender="a@test.example", rcpts=["x@test.example"], queue="deferred", mtime=later),
        dict(sender="a@test.example", rcpts=["y@mx.test.example"], queue="deferred", mtime=later),
        dict(sender="a@test.example", rcpts=["k@test.example", "z@mx.test.example"],
             queue="deferred", mtime=later),
        dict(sender="a@test.example", rcpts=["w@localhost"], queue="deferred", mtime=later))
    rig.inst.start()
    rig.inst.cmd("postqueue", "-i", one)
    rig.wait_removed(one)
    rig.inst.cmd("postqueue", "-s", "MX.test.example")
    rig.wait_removed(site_a)
    rig.wait_removed(site_b)
    time.sleep(0.5)
    assert rig.where(other) == "deferred"
    assert not rig.delivered_to("w@localhost")


# -- postsuper ------------------------------------------------------------------------------------------------

def test_postsuper_delete(rig):
    ids = populate(rig)
    p = rig.inst.cmd("postsuper", "-d", ids["deferred"])
    assert p.stderr == (f"postsuper: {ids['deferred']}: removed\n"
                        "postsuper: Deleted: 1 message\n")
    assert rig.where(ids["deferred"]) is None
    assert rig.queue.read_log("defer", ids["deferred"]) == []
    assert f"pymta/postsuper[" in rig.inst.log() and f"{ids['deferred']}: removed" in rig.inst.log()
    # From stdin, with an id that is not there and one that is no id at all.
    p = rig.inst.cmd("postsuper", "-d", "-",
                     input=f"{ids['incoming']}\n{ids['deferred']}\n../../etc/passwd\n")
    assert p.stderr == (f"postsuper: {ids['incoming']}: removed\n"
                        "postsuper: warning: invalid mail queue id: ../../etc/passwd\n"
                        "postsuper: Deleted: 1 message\n")
    # ALL in one queue only.
    p = rig.inst.cmd("postsuper", "-d", "ALL", "hold")
    assert p.stderr == "postsuper: Deleted: 1 message\n"
    assert rig.where(ids["active"]) == "active"
    p = rig.inst.cmd("postsuper", "-d", "ALL")
    assert p.stderr == "postsuper: Deleted: 1 message\n"
    assert rig.inst.cmd("mailq").stdout == "Mail queue is empty\n"


def test_postsuper_hold_and_release(rig):
    ids = populate(rig)
    p = rig.inst.cmd("postsuper", "-h", ids["deferred"])
    assert p.stderr == (f"postsuper: {ids['deferred']}: placed on hold\n"
                        "postsuper: Placed on hold: 1 message\n")
    assert rig.where(ids["deferred"]) == "hold"
    assert f"{ids['deferred']}!" in rig.inst.cmd("mailq").stdout
    p = rig.inst.cmd("postsuper", "-H", ids["deferred"])
    assert p.stderr == (f"postsuper: {ids['deferred']}: released from hold\n"
                        "postsuper: Released from hold: 1 message\n")
    assert rig.where(ids["deferred"]) == "deferred"
    p = rig.inst.cmd("postsuper", "-h", "ALL")
    assert p.stderr == "postsuper: Placed on hold: 3 messages\n"
    assert sorted(rig.ids("hold")) == sorted(ids[k] for k in ("incoming", "active",
                                                               "deferred", "hold"))
    p = rig.inst.cmd("postsuper", "-H", "ALL")
    assert p.stderr == "postsuper: Released from hold: 4 messages\n"
    assert len(rig.ids("deferred")) == 4


def test_postsuper_requeue_goes_through_maildrop(rig):
    qid = rig.inject(dict(sender="bob@test.example",
                          rcpts=["x@test.example", {"address": "y@test.example",
                                                    "notify": "FAILURE"}],
                          content=BODY, queue="deferred", attrs={"ret": "HDRS",
                                                                 "client_name": "c"}))[0]
    with rig.queue.open("deferred", qid) as qf:
        qf.mark_done(0)
    p = rig.inst.cmd("postsuper", "-r", qid)
    assert p.stderr == f"postsuper: {qid}: requeued\npostsuper: Requeued: 1 message\n"
    assert rig.where(qid) is None
    [name] = rig.ids("maildrop")
    st = os.stat(os.path.join(rig.spool, "maildrop", name))
    assert st.st_uid == os.stat(os.path.join(rig.spool, "incoming")).st_uid
    with rig.queue.read_maildrop(name) as qf:
        assert qf.sender == "bob@test.example"
        assert [(r.address, r.notify) for r in qf.recipients] == [("y@test.example", "FAILURE")]
        assert qf.attrs == {"ret": "HDRS"}
        assert qf.read_content() == BODY.encode()


def test_requeued_message_is_picked_up_and_delivered(instance):
    rig = Rig(instance, services=["pickup unix n - n 60 1 pickup"])
    qid = rig.inject(dict(sender="bob@test.example", rcpts=["x@test.example"], content=BODY,
                          queue="hold"))[0]
    instance.start()
    instance.cmd("postsuper", "-r", qid)
    wait_for(lambda: rig.delivered_to("x@test.example"), what="the requeued message delivered")
    [rec] = rig.records()
    assert rec["queue_id"] != qid and rec["sender"] == "bob@test.example"
    assert rig.ids("maildrop") == [] and rig.where(qid) is None


def test_postsuper_purges_old_temporary_files(rig):
    d = rig.queue.dir("incoming", "0")
    os.makedirs(d, exist_ok=True)
    old = os.path.join(d, ".tmp.debris")
    with open(old, "w") as f:
        f.write("x")
    os.utime(old, (time.time() - 3 * 86400,) * 2)
    fresh = os.path.join(d, ".tmp.fresh")
    with open(fresh, "w") as f:
        f.write("x")
    rig.inst.cmd("postsuper")
    assert not os.path.exists(old) and os.path.exists(fresh)


def test_postsuper_structure_repair_rehashes(rig):
    qid = rig.inject(dict(sender="a@test.example", rcpts=["x@test.example"],
                          queue="deferred"))[0]
    right = rig.queue.path("deferred", qid)
    wrong = os.path.join(rig.spool, "deferred", qid)
    os.rename(right, wrong)
    shutil.rmtree(os.path.join(rig.spool, "hold"))
    p = rig.inst.cmd("postsuper", "-s")
    assert os.path.exists(right) and not os.path.exists(wrong)
    assert os.path.isdir(os.path.join(rig.spool, "hold", "F"))
    assert "Moved to the right subdirectory: 1 file" in p.stderr


def test_postsuper_refuses_unknown_queue_names(rig):
    p = rig.inst.cmd("postsuper", "-d", "ALL", "../../tmp", check=False)
    assert p.returncode == 1
    assert p.stderr == "postsuper: fatal: invalid directory name: ../../tmp\n"


# -- postcat ------------------------------------------------------------------------------------------------------

def test_postcat_sections(rig):
    qid = rig.inject(dict(sender="bob@test.example",
                          rcpts=[{"address": "x@test.example", "orig": "alias@test.example"},
                                 "y@test.example"],
                          content=BODY, queue="deferred", attrs={"ret": "FULL"},
                          arrival=1700000000.5))[0]
    with rig.queue.open("deferred", qid) as qf:
        qf.mark_done(1)
    rel = os.path.relpath(rig.queue.path("deferred", qid), rig.spool)
    out = rig.inst.cmd("postcat", "-q", qid).stdout
    head, body = BODY.split("\n\n", 1)
    assert out == (
        f"*** ENVELOPE RECORDS {rel} ***\n"
        + "message_size: %15d %15d %15d %15d %15d\n" % (len(BODY), 26, 2, 0, len(BODY))
        + f"message_arrival_time: {time.asctime(time.localtime(1700000000))}\n"
        "sender: bob@test.example\n"
        "named_attribute: ret=FULL\n"
        "original_recipient: alias@test.example\n"
        "recipient: x@test.example\n"
        "done_recipient: y@test.example\n"
        f"*** MESSAGE CONTENTS {rel} ***\n"
        + BODY
        + f"*** HEADER EXTRACTED {rel} ***\n"
        f"*** MESSAGE FILE END {rel} ***\n")
    assert rig.inst.cmd("postcat", "-hq", qid).stdout == head + "\n"
    assert rig.inst.cmd("postcat", "-bq", qid).stdout == "\n" + body
    env = rig.inst.cmd("postcat", "-e", "-q", qid).stdout
    assert "Hello." not in env and env.endswith(f"*** MESSAGE FILE END {rel} ***\n")
    by_path = rig.inst.cmd("postcat", "-b", rig.queue.path("deferred", qid)).stdout
    assert by_path == "\n" + body


def test_postcat_errors(rig):
    p = rig.inst.cmd("postcat", "-q", "1xVFNj2J7q96vp2aZx", check=False)
    assert p.returncode == 1
    assert p.stderr == "postcat: fatal: open queue file 1xVFNj2J7q96vp2aZx: No such file or directory\n"
    p = rig.inst.cmd("postcat", "-q", "../x", check=False)
    assert p.returncode == 1 and "bad mail queue ID" in p.stderr
    p = rig.inst.cmd("postcat", os.path.join(rig.inst.etc, "main.cf"))
    assert "input is not a valid queue file" in p.stderr and p.stdout == ""
