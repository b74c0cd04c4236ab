"""qmgr with real instances: the master runs qmgr, and the transports
`local` and `smtp` are tests/system/programs/fake_agent.py, which answers
per recipient as a behaviour file says and records every request.  Messages
are put into the queue with the Queue API as the queue owner, then qmgr is
triggered, as cleanup does."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pymta.core import dsn as dsnlib
from pymta.core.queue import Queue
from pymta.core.trigger import send_trigger
from tests.conftest import wait_for

FAKE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "programs", "fake_agent.py")
BODY = "Subject: test\nFrom: Alice <alice@test.example>\nMessage-Id: <m1@test.example>\n\nHello.\n"
QUEUES = ("maildrop", "incoming", "active", "deferred", "hold", "corrupt")
SMTP_MISSING = ("delivery temporarily suspended: connect to transport private/smtp: "
                "No such file or directory")

_INJECT = r"""
import json, os, sys
from pymta.core.queue import Queue
spec = json.load(sys.stdin)
q = Queue(spec["spool"], spec["depth"])
out = []
for m in spec["messages"]:
    w = q.create(m.get("queue", "incoming"), m.get("arrival"))
    w.set_sender(m["sender"])
    for r in m["rcpts"]:
        if isinstance(r, str):
            w.add_recipient(r)
        else:
            w.add_recipient(r["address"], orig=r.get("orig"), notify=r.get("notify"),
                            orcpt=r.get("orcpt"))
    for k, v in m.get("attrs", {}).items():
        w.set_attr(k, v)
    if m.get("warn"):
        w.set_warn_time(m["warn"])
    w.write_content(m.get("content", "Subject: x\n\nx\n").encode())
    qid = w.commit()
    if m.get("mtime") is not None:
        q.set_next_attempt(m.get("queue", "incoming"), qid, m["mtime"])
    out.append(qid)
print(json.dumps(out))
"""


def _as_owner(path):
    """subprocess keywords that run a helper as the owner of `path` when
    we are root (the services run as mail_owner and must read its files)."""
    if os.geteuid() != 0:
        return {}
    st = os.stat(path)
    return {"user": st.st_uid, "group": st.st_gid}


class Rig:
    """An instance whose delivery agents are fake_agent.py."""

    def __init__(self, inst, transports=("local",), main_cf=None, services=()):
        self.inst = inst
        self.dir = inst.path("fake")
        os.makedirs(self.dir, exist_ok=True)
        os.chmod(self.dir, 0o777)
        self.behaviour = os.path.join(self.dir, "behaviour.json")
        self.record = os.path.join(self.dir, "record.jsonl")
        self.behave()
        lines = ["qmgr unix n - n 300 1 qmgr"]
        lines += [f"{t} unix - n n - - {FAKE} {self.behaviour} {self.record}" for t in transports]
        lines += list(services)
        inst.write_master_cf("\n".join(lines) + "\n")
        if main_cf:
            inst.postconf_e(**main_cf)
        self.spool = inst.path("spool")
        self.queue = Queue(self.spool)

    # -- setting up ----------------------------------------------------------------------------
    def behave(self, **how):
        how.setdefault("default", {"result": "sent"})
        tmp = self.behaviour + ".tmp"
        with open(tmp, "w") as f:
            json.dump(how, f)
        os.chmod(tmp, 0o644)
        os.rename(tmp, self.behaviour)

    def inject(self, *messages):
        """Queue messages (dicts: sender, rcpts, content, arrival, queue,
        attrs, warn, mtime); returns their queue ids."""
        spec = {"spool": self.spool, "depth": 1, "messages": list(messages)}
        p = subprocess.run([sys.executable, "-c", _INJECT], input=json.dumps(spec).encode(),
                           capture_output=True, check=True,
                           **_as_owner(os.path.join(self.spool, "incoming")))
        return json.loads(p.stdout)

    def send(self, sender, *rcpts, **kw):
        qid = self.inject(dict(sender=sender, rcpts=list(rcpts), content=BODY, **kw))[0]
        self.trigger(b"I")
        return qid

    def trigger(self, data=b"I"):
        assert send_trigger(self.inst.path("run", "public", "qmgr"), data)

    # -- looking -----------------------------------------------------------------------------
    def records(self):
        try:
            with open(self.record) as f:
                return [json.loads(line) for line in f]
        except FileNotFoundError:
            return []

    def where(self, qid):
        return self.queue.find(qid)

    def ids(self, name):
        return list(self.queue.scan(name))

    def empty(self):
        return not any(self.ids(name) for name in ("incoming", "active", "deferred"))

    def wait_removed(self, qid, timeout=15):
        self.inst.wait_log(f"{qid}: removed", timeout)
        assert self.where(qid) is None

    def wait_deferred(self, qid, timeout=15):
        wait_for(lambda: self.where(qid) == "deferred", timeout, what=f"{qid} in deferred")

    def delivered_to(self, address):
        return [r for r in self.records() if address in r["rcpts"]]

    def qmgr_pid(self):
        for pid, title in self.inst.process_titles().items():
            if "qmgr" in title:
                return pid
        return None


def saved_content(rig, qid):
    with open(os.path.join(rig.dir, f"content.{qid}"), "rb") as f:
        return f.read()


def notice_id(inst, qid, kind="sender non-delivery"):
    """The queue id of the notification qmgr made for `qid`."""
    needle = f"{qid}: {kind} notification: "
    inst.wait_log(needle)
    return line_with(inst.log(), needle).split()[-1]


def line_with(text, needle):
    for line in text.splitlines():
        if needle in line:
            return line
    raise AssertionError(f"no log line with {needle!r}")


@pytest.fixture
def rig(instance):
    r = Rig(instance)
    instance.start()
    return r


def make_rig(instance, **kw):
    r = Rig(instance, **kw)
    instance.start()
    return r


# -- the delivery path -------------------------------------------------------------------------

def test_incoming_to_active_to_removed_with_log_lines(rig):
    qid = rig.send("alice@test.example", "bob@test.example", "carol@test.example")
    rig.wait_removed(qid)
    log = rig.inst.log()
    assert f"pymta/qmgr[" in line_with(log, f"{qid}: from=<alice@test.example>")
    assert f"{qid}: from=<alice@test.example>, size={len(BODY)}, nrcpt=2 (queue active)" in log
    for who in ("bob", "carol"):
        line = line_with(log, f"{qid}: to=<{who}@test.example>")
        assert "relay=local" in line and "dsn=2.0.0" in line and "status=sent" in line
        assert ", delay=" in line and ", delays=" in line
    # Both recipients of one domain went in one request, over one connection.
    recs = rig.records()
    assert len(recs) == 1
    assert recs[0]["rcpts"] == ["bob@test.example", "carol@test.example"]
    assert recs[0]["transport"] == "local" and recs[0]["nexthop"] == "test.example"
    assert log.index(f"{qid}: from=<") < log.index(f"{qid}: to=<bob") < log.index(f"{qid}: removed")
    assert rig.empty()


def test_connections_are_kept_open_between_requests(rig):
    ids = [rig.send("alice@test.example", f"u{i}@test.example") for i in range(5)]
    for qid in ids:
        rig.wait_removed(qid)
    pids = {r["pid"] for r in rig.records()}
    assert len(pids) == 1       # one agent process served all: one connection kept


def test_per_recipient_results_then_flush(instance):
    rig = make_rig(instance)
    rig.behave(rcpt={"bad@test.example": {"result": "bounced", "dsn": "5.1.1",
                                          "reason": "unknown user: \"bad\""},
                     "later@test.example": {"result": "deferred", "dsn": "4.2.1",
                                            "reason": "mailbox busy"}})
    before = time.time()
    qid = rig.send("alice@test.example", "good@test.example", "bad@test.example",
                   "later@test.example")
    rig.wait_deferred(qid)
    # Only `later` is still pending; the others are marked done in place.
    with rig.queue.open("deferred", qid, readonly=True) as qf:
        assert [(r.address, r.done) for r in qf.recipients] == [
            ("good@test.example", True), ("bad@test.example", True),
            ("later@test.example", False)]
    entries = rig.queue.read_log("defer", qid)
    assert [(e["recipient"], e["dsn"], e["reason"]) for e in entries] == [
        ("later@test.example", "4.2.1", "mailbox busy")]
    # Next attempt (the mtime) after minimal_backoff_time (300s by default).
    mtime = rig.queue.next_attempt("deferred", qid)
    assert before + 299 <= mtime <= time.time() + 301
    # The bounced recipient got one notice, to the sender, from <>.
    new = notice_id(rig.inst, qid)
    rig.wait_removed(new)
    rec = [r for r in rig.records() if r["queue_id"] == new]
    assert rec and rec[0]["sender"] == "" and rec[0]["rcpts"] == ["alice@test.example"]
    # A flush retries it at once; now it is delivered and removed.
    rig.behave()
    instance.cmd("postqueue", "-f")
    rig.wait_removed(qid)
    assert len(rig.delivered_to("later@test.example")) == 2
    assert len(rig.delivered_to("good@test.example")) == 1


def test_bounce_notice_is_a_parseable_report(instance):
    rig = make_rig(instance)
    rig.behave(rcpt={"bad@test.example": {"result": "bounced", "dsn": "5.1.1",
                                          "reason": "unknown user: \"bad\""}},
               save=True)
    qid = rig.send("alice@test.example", "bad@test.example", "ok@test.example")
    rig.wait_removed(qid)
    new = notice_id(instance, qid)
    rig.wait_removed(new)
    report = dsnlib.parse_dsn(saved_content(rig, new))
    assert report.headers["subject"] == "Undelivered Mail Returned to Sender"
    assert report.message_fields["x-pymta-queue-id"] == qid
    assert len(report.recipients) == 1
    r = report.recipients[0]
    assert r["final-recipient"] == "rfc822; bad@test.example"
    assert r["action"] == "failed" and r["status"] == "5.1.1"
    assert 'unknown user: "bad"' in r["diagnostic-code"]
    assert report.returned_type == "message/rfc822"
    assert report.returned.endswith(b"Hello.\n")
    assert b"Subject: test" in report.returned


def test_ret_hdrs_returns_headers_only_and_notify_never_is_silent(instance):
    rig = make_rig(instance)
    rig.behave(rcpt={"bad@test.example": {"result": "bounced", "dsn": "5.1.1"},
                     "quiet@test.example": {"result": "bounced", "dsn": "5.1.1"}},
               save=True)
    hdrs = rig.inject(dict(sender="alice@test.example", rcpts=["bad@test.example"],
                           content=BODY, attrs={"ret": "HDRS", "envid": "ENV-1"}))[0]
    never = rig.inject(dict(sender="alice@test.example",
                            rcpts=[{"address": "quiet@test.example", "notify": "NEVER"}],
                            content=BODY))[0]
    rig.trigger()
    rig.wait_removed(hdrs)
    rig.wait_removed(never)
    new = notice_id(instance, hdrs)
    rig.wait_removed(new)
    report = dsnlib.parse_dsn(saved_content(rig, new))
    assert report.returned_type == "text/rfc822-headers"
    assert b"Hello." not in report.returned and b"Subject: test" in report.returned
    assert report.message_fields["original-envelope-id"] == "ENV-1"
    assert f"{never}: sender non-delivery notification" not in instance.log()


# -- deferral, backoff, expiry ----------------------------------------------------------------------

def test_missing_smtp_agent_defers_with_the_reason(rig):
    qid = rig.send("alice@test.example", "bob@remote.example", "carol@test.example")
    rig.wait_deferred(qid)
    log = rig.inst.log()
    line = line_with(log, f"{qid}: to=<bob@remote.example>")
    assert "relay=none" in line and "dsn=4.3.0" in line
    assert line.endswith(f"status=deferred ({SMTP_MISSING})")
    assert "warning: connect to transport private/smtp: No such file or directory" in log
    assert rig.delivered_to("carol@test.example")
    [entry] = rig.queue.read_log("defer", qid)
    assert entry["reason"] == SMTP_MISSING


def test_backoff_doubles_with_age_between_the_limits(instance):
    rig = make_rig(instance, main_cf={"minimal_backoff_time": "100s",
                                      "maximal_backoff_time": "2000s"})
    rig.behave(default={"result": "deferred", "dsn": "4.4.1", "reason": "no route"})
    now = time.time()
    young, middle, old = rig.inject(
        dict(sender="a@test.example", rcpts=["x@test.example"], arrival=now - 10),
        dict(sender="a@test.example", rcpts=["x@test.example"], arrival=now - 700),
        dict(sender="a@test.example", rcpts=["x@test.example"], arrival=now - 86400))
    rig.trigger()
    for qid in (young, middle, old):
        rig.wait_deferred(qid)
    t = time.time()
    assert now + 100 - 1 <= rig.queue.next_attempt("deferred", young) <= t + 101
    assert now + 700 - 1 <= rig.queue.next_attempt("deferred", middle) <= t + 711
    assert now + 2000 - 1 <= rig.queue.next_attempt("deferred", old) <= t + 2001


def test_deferred_queue_run_takes_only_due_messages(instance):
    rig = make_rig(instance, main_cf={"queue_run_delay": "1s"})
    now = time.time()
    due, later = rig.inject(
        dict(sender="a@test.example", rcpts=["due@test.example"], queue="deferred", mtime=now - 5),
        dict(sender="a@test.example", rcpts=["later@test.example"], queue="deferred",
             mtime=now + 3600))
    rig.wait_removed(due)
    time.sleep(2.5)
    assert rig.where(later) == "deferred"
    assert not rig.delivered_to("later@test.example")
    instance.cmd("postqueue", "-f")
    rig.wait_removed(later)


def test_expired_message_is_returned_with_its_defer_reason(instance):
    rig = make_rig(instance, main_cf={"maximal_queue_lifetime": "1d"})
    rig.behave(rcpt={"slow@test.example": {"result": "deferred", "dsn": "4.4.1",
                                           "reason": "connection timed out"}},
               save=True)
    qid = rig.inject(dict(sender="alice@test.example", rcpts=["slow@test.example"],
                          content=BODY, queue="deferred", arrival=time.time() - 2 * 86400,
                          mtime=time.time() - 1))[0]
    instance.cmd("postqueue", "-f")
    rig.wait_removed(qid)
    log = instance.log()
    assert f"{qid}: from=<alice@test.example>, status=expired, returned to sender" in log
    new = notice_id(instance, qid)
    rig.wait_removed(new)
    report = dsnlib.parse_dsn(saved_content(rig, new))
    [r] = report.recipients
    assert r["final-recipient"] == "rfc822; slow@test.example"
    assert r["action"] == "failed" and r["status"] == "4.4.1"
    assert "connection timed out" in r["diagnostic-code"]


def test_delay_warning_is_sent_once(instance):
    rig = make_rig(instance, main_cf={"delay_warning_time": "1s"})
    rig.behave(rcpt={"slow@test.example": {"result": "deferred", "dsn": "4.4.1",
                                           "reason": "connection refused"}},
               save=True)
    qid = rig.inject(dict(sender="alice@test.example", rcpts=["slow@test.example"],
                          content=BODY, arrival=time.time() - 30))[0]
    rig.trigger()
    rig.wait_deferred(qid)
    new = notice_id(instance, qid, "sender delay")
    rig.wait_removed(new)
    report = dsnlib.parse_dsn(saved_content(rig, new))
    assert report.headers["subject"] == "Delayed Mail (still being retried)"
    [r] = report.recipients
    assert r["action"] == "delayed" and r["status"] == "4.4.1"
    instance.cmd("postqueue", "-f")
    wait_for(lambda: len(rig.delivered_to("slow@test.example")) == 2, what="second attempt")
    rig.wait_deferred(qid)
    time.sleep(0.5)
    assert instance.log().count(f"{qid}: sender delay notification") == 1


def test_hold_queue_is_never_touched(instance):
    rig = make_rig(instance)
    held = rig.inject(dict(sender="a@test.example", rcpts=["h@test.example"], queue="hold",
                           mtime=time.time() - 100))[0]
    instance.cmd("postqueue", "-f")
    qid = rig.send("a@test.example", "n@test.example")
    rig.wait_removed(qid)
    time.sleep(0.5)
    assert rig.where(held) == "hold"
    assert not rig.delivered_to("h@test.example")


# -- notifications never loop ----------------------------------------------------------------------

def test_undeliverable_bounce_goes_to_postmaster_and_never_loops(instance):
    rig = make_rig(instance)
    rig.behave(rcpt={"gone@test.example": {"result": "bounced", "dsn": "5.1.1"},
                     "postmaster@mx.test.example": {"result": "bounced", "dsn": "5.2.0",
                                                    "reason": "postmaster is full"}},
               save=True)
    # A bounce (from <>) that bounces: a postmaster copy, from double-bounce.
    qid = rig.send("", "gone@test.example")
    rig.wait_removed(qid)
    log = instance.log()
    assert f"{qid}: sender non-delivery notification" not in log
    copy = notice_id(instance, qid, "postmaster non-delivery")
    # The copy bounces too: it is dropped with a log line, nothing more.
    rig.wait_removed(copy)
    instance.wait_log(f"warning: {copy}: undeliverable postmaster notification discarded")
    rec = [r for r in rig.records() if r["queue_id"] == copy][0]
    assert rec["sender"] == "double-bounce@mx.test.example"
    assert rec["rcpts"] == ["postmaster@mx.test.example"]
    report = dsnlib.parse_dsn(saved_content(rig, copy))
    assert report.headers["subject"] == "Postmaster Copy: Undelivered Mail"
    assert report.returned_type == "text/rfc822-headers"
    time.sleep(1)
    log = instance.log()
    assert f"{copy}: sender non-delivery notification" not in log
    assert f"{copy}: postmaster non-delivery notification" not in log
    assert rig.empty()


def test_notify_classes_bounce_copies_the_postmaster(instance):
    rig = make_rig(instance, main_cf={"notify_classes": "bounce, resource, software"})
    rig.behave(rcpt={"gone@test.example": {"result": "bounced", "dsn": "5.1.1"}})
    qid = rig.send("alice@test.example", "gone@test.example")
    rig.wait_removed(qid)
    to_sender = notice_id(instance, qid)
    copy = notice_id(instance, qid, "postmaster non-delivery")
    rig.wait_removed(to_sender)
    rig.wait_removed(copy)
    senders = {r["queue_id"]: (r["sender"], r["rcpts"]) for r in rig.records()}
    assert senders[to_sender] == ("", ["alice@test.example"])
    assert senders[copy] == ("double-bounce@mx.test.example", ["postmaster@mx.test.example"])


# -- transports and routes ----------------------------------------------------------------------------

def test_transport_maps_error_discard_and_relay(instance):
    rig = Rig(instance, transports=("local", "smtp"), main_cf={
        "transport_maps": "inline:{ { blocked.example = error:5.7.1 go away }, "
                          "void.example=discard:, relayed.example=smtp:[127.0.0.1]:2626 }"})
    instance.start()
    qid = rig.send("alice@test.example", "x@blocked.example", "y@void.example",
                   "z@relayed.example", "w@other.example")
    rig.wait_removed(qid)
    log = instance.log()
    blocked = line_with(log, f"{qid}: to=<x@blocked.example>")
    assert "relay=none" in blocked and "dsn=5.7.1" in blocked and blocked.endswith(
        "status=bounced (go away)")
    void = line_with(log, f"{qid}: to=<y@void.example>")
    assert "dsn=2.0.0" in void and void.endswith("status=sent (discarded)")
    hops = {r["rcpts"][0]: (r["transport"], r["nexthop"]) for r in rig.records()
            if r["queue_id"] == qid}
    assert hops == {"z@relayed.example": ("smtp", "[127.0.0.1]:2626"),
                    "w@other.example": ("smtp", "other.example")}
    assert f"{qid}: sender non-delivery notification" in log


def test_relayhost_is_the_nexthop_of_remote_mail(instance):
    rig = Rig(instance, transports=("local", "smtp"), main_cf={"relayhost": "[10.9.8.7]:587"})
    instance.start()
    qid = rig.send("alice@test.example", "w@other.example", "l@test.example")
    rig.wait_removed(qid)
    hops = {r["rcpts"][0]: (r["transport"], r["nexthop"]) for r in rig.records()}
    assert hops == {"w@other.example": ("smtp", "[10.9.8.7]:587"),
                    "l@test.example": ("local", "test.example")}


# -- concurrency ----------------------------------------------------------------------------------------

def max_overlap(records):
    events = sorted([(r["start"], 1) for r in records] + [(r["end"], -1) for r in records],
                    key=lambda e: (e[0], e[1]))
    best = cur = 0
    for _, step in events:
        cur += step
        best = max(best, cur)
    return best


def test_destination_concurrency_limits_are_observed(instance):
    # test.example is a virtual mailbox domain: the default limit, as
    # Postfix's virtual(8); mx.test.example (mydestination) is local(8)'s.
    rig = make_rig(instance, main_cf={"default_destination_concurrency_limit": "4",
                                      "local_destination_concurrency_limit": "2"})
    rig.behave(delay=0.3)
    virtual = rig.inject(*[dict(sender="a@test.example", rcpts=[f"u{i}@test.example"])
                           for i in range(12)])
    system = rig.inject(*[dict(sender="a@test.example", rcpts=[f"u{i}@mx.test.example"])
                          for i in range(6)])
    rig.trigger()
    for qid in virtual + system:
        rig.wait_removed(qid, timeout=30)
    by_domain = {}
    for r in rig.records():
        by_domain.setdefault(r["nexthop"], []).append(r)
    assert len(by_domain["test.example"]) == 12 and len(by_domain["mx.test.example"]) == 6
    assert max_overlap(by_domain["test.example"]) == 4
    assert max_overlap(by_domain["mx.test.example"]) == 2
    # The two destinations run beside each other.
    assert max_overlap(rig.records()) > 4


def test_agent_dying_mid_request_defers_and_loses_nothing(instance):
    rig = make_rig(instance)
    rig.behave(exit=True)
    qid = rig.send("alice@test.example", "bob@test.example")
    rig.wait_deferred(qid)
    line = line_with(instance.log(), f"{qid}: to=<bob@test.example>")
    assert "dsn=4.3.0" in line and line.endswith("status=deferred (unknown mail transport error)")
    rig.behave()
    instance.cmd("postqueue", "-f")
    rig.wait_removed(qid)
    assert rig.delivered_to("bob@test.example")


def test_agent_error_reply_defers_with_its_reason(instance):
    rig = make_rig(instance)
    rig.behave(error="mailbox store offline")
    qid = rig.send("alice@test.example", "bob@test.example")
    rig.wait_deferred(qid)
    line = line_with(instance.log(), f"{qid}: to=<bob@test.example>")
    assert line.endswith("status=deferred (mailbox store offline)")


def test_damaged_file_goes_to_corrupt(instance):
    rig = make_rig(instance)
    # Damage it in hold/, which qmgr never reads (in incoming/ qmgr's scan
    # could take it before the damage), then put it where qmgr looks.
    qid = rig.inject(dict(sender="a@test.example", rcpts=["b@test.example"], queue="hold"))[0]
    path = rig.queue.path("hold", qid)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 3)
    rig.queue.move(qid, "hold", "incoming")
    rig.trigger()
    wait_for(lambda: rig.where(qid) == "corrupt", what="file moved to corrupt/")
    instance.wait_log(f'saving corrupt file "{qid}" from queue "incoming" to queue "corrupt"')


# -- stopping and crashes ------------------------------------------------------------------------------------------------

def test_kill_9_of_qmgr_mid_burst_recovers_the_active_queue(instance):
    rig = Rig(instance, main_cf={"default_destination_concurrency_limit": "3"})
    rig.behave(delay=0.02)
    count = 300
    # Queued before the start, so that qmgr takes them all at once.
    ids = rig.inject(*[dict(sender="a@test.example", rcpts=[f"r{i}@test.example"])
                       for i in range(count)])
    instance.start()
    wait_for(lambda: len(rig.records()) >= 20, what="deliveries under way")
    victim = rig.qmgr_pid()
    os.kill(victim, signal.SIGKILL)
    instance.wait_log(f"pid {victim} killed by signal 9")
    wait_for(lambda: rig.qmgr_pid() not in (None, victim), timeout=20, what="a new qmgr")
    rig.trigger()
    wait_for(rig.empty, timeout=60, what="an empty queue")
    for qid in ids:
        assert rig.where(qid) is None
    got = {}
    for r in rig.records():
        for a in r["rcpts"]:
            got[a] = got.get(a, 0) + 1
    assert set(got) == {f"r{i}@test.example" for i in range(count)}
    duplicates = sum(n - 1 for n in got.values())
    # Only requests in flight at the kill may be repeated: at most the
    # destination concurrency (3).
    assert duplicates <= 3
    assert "message(s) left in the active queue" in instance.log()


def test_stop_lets_running_deliveries_finish(instance):
    rig = make_rig(instance)
    rig.behave(delay=1.5)
    qid = rig.send("alice@test.example", "bob@test.example")
    wait_for(lambda: os.path.exists(os.path.join(rig.dir, f"started.{qid}")),
             what="the delivery to begin")
    instance.stop()
    assert rig.where(qid) is None
    assert f"{qid}: removed" in instance.log()
    instance.start()
    rig.trigger()
    time.sleep(1)
    assert len(rig.delivered_to("bob@test.example")) == 1


# -- the pieces, without an instance: routes and agent replies ---------------------------------------------

def resolver(**settings):
    from pymta.core.config import MainConfig
    from pymta.services.qmgr.transport import Resolver
    explicit = {"myhostname": ("mx.a.example", None, None), "mydomain": ("a.example", None, None)}
    explicit.update({k: (v, None, None) for k, v in settings.items()})
    return Resolver(MainConfig("/nonexistent/etc", explicit))


@pytest.mark.parametrize("address, transport, nexthop", [
    ("x@mx.a.example", "local", "mx.a.example"),
    ("x@A.Example", "local", "a.example"),              # virtual_mailbox_domains = $mydomain
    ("x@localhost", "local", "localhost"),
    ("root", "local", "mx.a.example"),
    ("x@far.example", "smtp", "far.example"),
    ('"a@b"@far.example', "smtp", "far.example"),
])
def test_default_routes(address, transport, nexthop):
    route = resolver().resolve(address)
    assert (route.transport, route.nexthop) == (transport, nexthop)


def test_transport_maps_lookup_order_and_relayhost():
    r = resolver(relayhost="[relay.example]:587", recipient_delimiter="+", transport_maps=(
        "inline:{ user@sub.b.example=local:, sub.b.example=smtp:[10.0.0.2], "
        ".b.example=relay:, { c.example = error:5.1.2 no such domain }, "
        "d.example=discard:, e.example=:[10.0.0.5]:26 }"))
    got = {a: (r.resolve(a).transport, r.resolve(a).nexthop) for a in (
        "user+tag@sub.b.example", "other@sub.b.example", "x@deep.sub2.b.example",
        "x@b.example", "x@c.example", "x@d.example", "x@e.example", "x@z.example")}
    assert got == {
        "user+tag@sub.b.example": ("local", "sub.b.example"),
        "other@sub.b.example": ("smtp", "[10.0.0.2]"),
        "x@deep.sub2.b.example": ("relay", "deep.sub2.b.example"),
        "x@b.example": ("smtp", "[relay.example]:587"),      # .b.example: subdomains only
        "x@c.example": ("error", "5.1.2 no such domain"),
        "x@d.example": ("discard", ""),
        "x@e.example": ("smtp", "[10.0.0.5]:26"),
        "x@z.example": ("smtp", "[relay.example]:587"),
    }
    assert r.resolve("x@c.example").error_status() == ("5.1.2", "no such domain")


def test_default_transport_with_a_nexthop():
    route = resolver(default_transport="smtp:[gw.example]").resolve("x@far.example")
    assert (route.transport, route.nexthop) == ("smtp", "[gw.example]")


def reply(*pairs):
    from pymta.core.ipc import Attrs
    return Attrs(pairs)


def test_agent_reply_is_checked_recipient_by_recipient():
    from pymta.services.qmgr.deliver import AgentError, AgentFailure, parse_reply
    ok = parse_reply(reply(("status", "ok"),
                           ("rcpt", "3"), ("result", "sent"), ("dsn", "2.0.0"),
                           ("reason", "delivered\tto maildir"), ("relay", "local"),
                           ("rcpt", "5"), ("result", "bounced"), ("dsn", "2.0.0"),
                           ("reason", "x"), ("unknown", "skipped")), [3, 5])
    assert (ok[3].result, ok[3].dsn, ok[3].reason) == ("sent", "2.0.0", "delivered to maildir")
    assert (ok[5].result, ok[5].dsn, ok[5].relay) == ("bounced", "5.0.0", "none")
    with pytest.raises(AgentError, match="disk full"):
        parse_reply(reply(("status", "error"), ("reason", "disk full")), [0])
    bad = [
        [("status", "maybe")],
        [("status", "ok"), ("rcpt", "0"), ("result", "sent")],                  # 1 missing
        [("status", "ok"), ("rcpt", "0"), ("result", "sent"), ("rcpt", "0"),
         ("result", "sent"), ("rcpt", "1"), ("result", "sent")],                 # twice
        [("status", "ok"), ("rcpt", "0"), ("result", "lost"),
         ("rcpt", "1"), ("result", "sent")],                                      # no such result
        [("status", "ok"), ("rcpt", "0"), ("result", "sent"), ("rcpt", "7"),
         ("result", "sent")],                                                     # not requested
        [("status", "ok"), ("rcpt", "-1"), ("result", "sent")],
        [("status", "ok"), ("rcpt", "0"), ("result", "sent"), ("result", "bounced"),
         ("rcpt", "1"), ("result", "sent")],                                      # repeated field
    ]
    for pairs in bad:
        with pytest.raises(AgentFailure):
            parse_reply(reply(*pairs), [0, 1])
