"""pymta.core.agent: the agent side of docs/delivery-protocol.md."""

import asyncio
import io
import socket
import time

import pytest

from pymta.core import agent, ipc
from pymta.core.queue import Queue
from pymta.core.queue_id import new_queue_id

# (seconds, significant digits, decimals, printed): Postfix's format_tv.ref.
FORMAT_TV = [
    (1110, 2, 6, "1110"), (111, 2, 6, "111"), (11.1, 2, 6, "11"),
    (1.11, 2, 6, "1.1"), (0.111, 2, 6, "0.11"), (0.0111, 2, 6, "0.011"),
    (0.00111, 2, 6, "0.0011"), (0.000111, 2, 6, "0.00011"),
    (0.000011, 2, 6, "0.000011"), (1000, 2, 6, "1000"), (10, 2, 6, "10"),
    (1, 2, 6, "1"), (0.1, 2, 6, "0.1"), (0.01, 2, 6, "0.01"),
    (0.000001, 2, 6, "0.000001"), (996, 2, 6, "996"), (99.6, 2, 6, "100"),
    (9.96, 2, 6, "10"), (0.996, 2, 6, "1"), (0.0996, 2, 6, "0.1"),
    (0.00996, 2, 6, "0.01"), (0.000996, 2, 6, "0.001"),
    (1.11, 1, 6, "1"), (0.111, 1, 6, "0.1"), (0.0111, 1, 6, "0.01"),
    (99.6, 1, 6, "100"), (0.0996, 1, 6, "0.1"),
]


@pytest.mark.parametrize("seconds,sig,dig,printed", FORMAT_TV)
def test_format_tv_matches_postfix(seconds, sig, dig, printed):
    assert agent.format_tv(seconds, sig, dig) == printed


@pytest.mark.parametrize("seconds,printed", [
    (0.0123, "0.01"), (0.2, "0.2"), (1.3, "1.3"), (1.25, "1.3"), (12.4, "12"),
    (0.004, "0"), (0.005, "0.01"), (0, "0"), (-3, "0"), (float("nan"), "0"),
    (86400.5, "86401"),
])
def test_format_tv_with_the_logging_defaults(seconds, printed):
    assert agent.format_tv(seconds) == printed


def test_delays_split_like_postfix():
    t = agent.Times(arrival=100.0, active=100.05, handoff=100.06, done=100.21)
    assert agent.format_delays(t) == ("0.21", "0.05/0.01/0/0.15")
    t = agent.Times(arrival=100.0, active=101.0, handoff=101.5, conn_done=102.0, done=112.0)
    assert agent.format_delays(t) == ("12", "1/0.5/0.5/10")
    # A clock that stepped back gives zeros, never negative numbers.
    t = agent.Times(arrival=200.0, active=150.0, handoff=150.0, done=199.0)
    assert agent.format_delays(t) == ("0", "0/0/0/49")


def test_delivery_line_format():
    t = agent.Times(arrival=100.0, active=100.05, handoff=100.06, done=100.21)
    line = agent.delivery_line("1QID", "bob@x", "Bob@X", "local", t, "2.0.0", "sent",
                               "delivered to maildir")
    assert line == ("1QID: to=<bob@x>, relay=local, delay=0.21, delays=0.05/0.01/0/0.15, "
                    "dsn=2.0.0, status=sent (delivered to maildir)")
    t.conn_use = 2
    line = agent.delivery_line("1QID", "bob@x", "list@x", "mx[1.2.3.4]:25", t, "4.4.1",
                               "deferred", "lost\nconnection")
    assert line == ("1QID: to=<bob@x>, orig_to=<list@x>, relay=mx[1.2.3.4]:25, conn_use=3, "
                    "delay=0.21, delays=0.05/0.01/0/0.15, dsn=4.4.1, "
                    "status=deferred (lost connection)")


def request_attrs(**kw):
    pairs = [("request", "deliver"), ("queue_name", "active"),
             ("queue_id", kw.pop("queue_id", new_queue_id(7, time.time()))),
             ("transport", "local"), ("nexthop", "example.org"),
             ("active_time", "1700000000.5"), ("dispatch_time", "1700000001")]
    pairs = [(n, kw.pop(n, v)) for n, v in pairs]
    pairs += [("rcpt", str(i)) for i in kw.pop("rcpts", [0, 2])]
    pairs += list(kw.items())
    return ipc.Attrs([(n, v) for n, v in pairs if v is not None])


def test_request_parsing():
    r = agent.DeliveryRequest.from_attrs(request_attrs(future="ignored"), received=5.0)
    assert (r.queue_name, r.transport, r.nexthop, r.rcpts) == ("active", "local",
                                                               "example.org", [0, 2])
    assert (r.active_time, r.dispatch_time, r.received) == (1700000000.5, 1700000001.0, 5.0)


@pytest.mark.parametrize("change", [
    {"request": "flush"}, {"queue_name": "deferred"}, {"queue_name": None},
    {"queue_id": "../../etc/passwd"}, {"transport": "a b"}, {"rcpts": []},
    {"rcpts": ["-1"]}, {"rcpts": ["1e3"]}, {"active_time": "nan"},
    {"dispatch_time": "-5"}, {"nexthop": "x\ty"},
])
def test_bad_requests_are_protocol_errors(change):
    with pytest.raises(ipc.ProtocolError):
        agent.DeliveryRequest.from_attrs(request_attrs(**change))


def test_result_checks_its_values():
    agent.Result(0, "sent", "2.0.0", "ok")
    for bad in [("sent", "5.1.1"), ("bounced", "2.0.0"), ("later", "4.0.0"),
                ("deferred", "4.x.0")]:
        with pytest.raises(ValueError):
            agent.Result(0, bad[0], bad[1], "x")
    with pytest.raises(ValueError):
        agent.Result(0, "sent", "2.0.0", "x", action="teleported")


def parse(data):
    return ipc.read_attrs_sync(io.BytesIO(data))


def test_reply_encoding_round_trips():
    results = [agent.Result(0, "sent", "2.0.0", "delivered to maildir"),
               agent.Result(3, "bounced", "5.1.1", 'unknown user: "x"\n%', action="failed"),
               agent.Result(1, "sent", "2.0.0", "alias expanded", action="expanded")]
    attrs = parse(agent.encode_reply(results))
    assert attrs == [
        ("status", "ok"),
        ("rcpt", "0"), ("result", "sent"), ("dsn", "2.0.0"),
        ("reason", "delivered to maildir"), ("relay", "local"),
        ("rcpt", "3"), ("result", "bounced"), ("dsn", "5.1.1"),
        ("reason", 'unknown user: "x" %'), ("relay", "local"), ("action", "failed"),
        ("rcpt", "1"), ("result", "sent"), ("dsn", "2.0.0"), ("reason", "alias expanded"),
        ("relay", "local"), ("action", "expanded")]
    assert parse(agent.encode_error("no\nfile")) == [("status", "error"),
                                                      ("reason", "no file")]


def test_open_queue_file(tmp_path):
    queue = Queue(str(tmp_path / "spool"))
    queue.create_dirs()
    w = queue.create("active")
    w.set_sender("a@b")
    w.add_recipient("c@d")
    w.add_recipient("e@f")
    w.write_content(b"Subject: x\n\nbody\n")
    qid = w.commit()
    req = agent.DeliveryRequest.from_attrs(request_attrs(queue_id=qid, rcpts=[1]))
    qf = agent.open_queue_file(queue, req)
    try:
        assert qf.readonly and qf.recipients[1].address == "e@f"
        assert qf.read_content() == b"Subject: x\n\nbody\n"
    finally:
        qf.close()
    req.rcpts = [2]
    with pytest.raises(agent.AgentError, match="out of range"):
        agent.open_queue_file(queue, req)
    req.queue_id = new_queue_id(99, time.time())
    with pytest.raises(agent.AgentError, match="not found"):
        agent.open_queue_file(queue, req)
    path = queue.path("active", qid)
    with open(path, "r+b") as f:
        f.write(b"garbage")
    req.queue_id = qid
    with pytest.raises(agent.AgentError, match="damaged"):
        agent.open_queue_file(queue, req)


class _Conn:
    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer


def serve(handle, requests):
    """Run serve_connection over a socket pair; return the raw replies."""
    async def main():
        a, b = socket.socketpair()
        reader, writer = await asyncio.open_unix_connection(sock=a)
        task = asyncio.ensure_future(agent.serve_connection(_Conn(reader, writer), handle))
        loop = asyncio.get_running_loop()
        b.setblocking(False)
        for r in requests:
            await loop.sock_sendall(b, r)
        b.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(task, 10)
        writer.close()
        chunks = []
        while True:
            data = await loop.sock_recv(b, 65536)
            if not data:
                break
            chunks.append(data)
        b.close()
        return b"".join(chunks)
    return asyncio.run(main())


def test_serve_connection_answers_requests_in_order():
    seen = []

    async def handle(req):
        seen.append(req.queue_id)
        if len(seen) == 2:
            raise agent.AgentError("queue file gone")
        return [agent.Result(i, "sent", "2.0.0", "ok") for i in req.rcpts]

    qids = [new_queue_id(n, time.time()) for n in (1, 2, 3)]
    data = serve(handle, [ipc.encode(request_attrs(queue_id=q, rcpts=[0, 1])) for q in qids])
    replies = data.split(b"\n\n")[:-1]
    assert len(replies) == 3 and seen == qids
    assert replies[0].startswith(b"status=ok\nrcpt=0\nresult=sent")
    assert replies[1] == b"status=error\nreason=queue file gone"
    assert replies[2].count(b"rcpt=") == 2


def test_serve_connection_reports_internal_errors_and_closes_on_garbage():
    async def handle(req):
        return [agent.Result(5, "sent", "2.0.0", "ok")]    # wrong index

    data = serve(handle, [ipc.encode(request_attrs()), b"no equals sign\n\n",
                          ipc.encode(request_attrs())])
    assert data == b"status=error\nreason=internal error in delivery agent: RuntimeError\n\n"


def test_a_delivery_in_progress_is_finished_and_answered_when_cancelled():
    async def main():
        a, b = socket.socketpair()
        reader, writer = await asyncio.open_unix_connection(sock=a)
        started = asyncio.Event()

        async def handle(req):
            started.set()
            await asyncio.sleep(0.2)
            return [agent.Result(i, "sent", "2.0.0", "done") for i in req.rcpts]

        task = asyncio.ensure_future(agent.serve_connection(_Conn(reader, writer), handle))
        loop = asyncio.get_running_loop()
        b.setblocking(False)
        await loop.sock_sendall(b, ipc.encode(request_attrs(rcpts=[0])))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        data = await loop.sock_recv(b, 65536)
        writer.close()
        b.close()
        return data
    data = asyncio.run(main())
    assert data.startswith(b"status=ok\nrcpt=0\nresult=sent\ndsn=2.0.0\nreason=done")


def test_log_delivery_writes_one_postfix_line(monkeypatch):
    from pymta.core import log
    lines = []
    monkeypatch.setattr(log, "info", lines.append)
    t = agent.Times(arrival=1.0, active=1.0, handoff=1.0, done=1.0)
    agent.log_delivery("1Q", "a@b", "", "local", t, "5.1.1", "bounced", 'unknown user: "a"')
    assert lines == ['1Q: to=<a@b>, relay=local, delay=0, delays=0/0/0/0, dsn=5.1.1, '
                     'status=bounced (unknown user: "a")']


def test_qmgr_gives_up_on_an_agent_that_does_not_answer(tmp_path):
    """A delivery agent that reads the request and never replies: the
    request fails after its timeout (AgentFailure), it does not hang."""
    from pymta.services.qmgr.deliver import AgentConnection, AgentFailure

    async def scenario():
        path = str(tmp_path / "agent")
        accepted = []

        async def silent(reader, writer):
            accepted.append(writer)
            await reader.read(1024)           # take the request, answer nothing

        server = await asyncio.start_unix_server(silent, path)
        reader, writer = await asyncio.open_unix_connection(path)
        conn = AgentConnection(reader, writer)
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(AgentFailure, match="no reply within 0.3s"):
            await conn.request([("queue_id", "X")], 0.3)
        assert 0.25 <= loop.time() - start < 5
        conn.close()
        for w in accepted:
            w.close()
        server.close()
        await server.wait_closed()

    asyncio.run(scenario())
