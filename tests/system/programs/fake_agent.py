"""fake_agent - a delivery agent for the qmgr tests.

It speaks docs/delivery-protocol.md (through pymta.core.agent, as the real
agents do) and answers each recipient as a behaviour file says, so the
tests can make qmgr see every kind of result.  master.cf names it by
absolute path, once per transport it stands in for:

    local  unix  -  n  n  -  -  /path/fake_agent.py BEHAVIOUR RECORD

BEHAVIOUR is a JSON file, read again for every request:

    {"default": {"result": "sent"},            result, dsn, reason
     "rcpt": {"bob@x": {"result": "bounced", "dsn": "5.1.1",
                        "reason": "unknown user"}},
     "delay": 0.2,                             seconds per request (and a
                                               file started.<queue id> beside
                                               RECORD when it begins)
     "error": "text",                          reply status=error
     "exit": true,                             die without replying
     "save": true}                             keep each message's content
                                               in content.<queue id> beside
                                               RECORD

RECORD gets one JSON line per request: pid, transport, nexthop, queue_id,
sender, the recipient addresses, the results, and start/end times (the
tests compute the largest number of overlapping requests from these).
Each recipient is logged like a real agent does.
"""

import asyncio
import json
import os
import sys
import time

from pymta.core import agent
from pymta.core.queue import Queue
from pymta.core.runtime import child

DSN = {"sent": "2.0.0", "deferred": "4.0.0", "bounced": "5.0.0"}
REASON = {"sent": "delivered to fake agent", "deferred": "fake agent says later",
          "bounced": "fake agent says no"}


def _service_name(argv):
    if "-n" in argv[:-1]:
        return argv[argv.index("-n") + 1]
    return "fake_agent"


def _behaviour(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _record(path, entry):
    line = (json.dumps(entry, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def main():
    ctx = child.start(_service_name(sys.argv[1:]))
    if len(ctx.extra_args) != 2:
        sys.stderr.write("usage: fake_agent.py [master arguments] BEHAVIOUR RECORD\n")
        return 64
    behaviour_path, record_path = ctx.extra_args
    queue = Queue(ctx.cfg.queue_directory, ctx.cfg.hash_queue_depth)
    relay = "local" if ctx.service_name == "local" else f"{ctx.service_name}.fake[127.0.0.1]:25"

    async def handle(request):
        start = time.time()
        how = _behaviour(behaviour_path)
        if how.get("exit"):
            os._exit(3)
        if how.get("delay"):
            started = os.path.join(os.path.dirname(record_path), f"started.{request.queue_id}")
            os.close(os.open(started, os.O_WRONLY | os.O_CREAT, 0o644))
            await asyncio.sleep(float(how["delay"]))
        if how.get("error"):
            raise agent.AgentError(how["error"])
        qf = agent.open_queue_file(queue, request)
        results, rcpts = [], []
        try:
            times = agent.Times.of(qf, request)
            for index in request.rcpts:
                rcpt = qf.recipients[index]
                rule = dict(how.get("default", {"result": "sent"}))
                rule.update(how.get("rcpt", {}).get(rcpt.address, {}))
                result = rule.get("result", "sent")
                dsn = rule.get("dsn", DSN[result])
                reason = rule.get("reason", REASON[result])
                results.append(agent.Result(index, result, dsn, reason, relay))
                rcpts.append(rcpt.address)
                agent.log_delivery(request.queue_id, rcpt.address, rcpt.orig, relay, times,
                                   dsn, result, reason)
            sender = qf.sender
            if how.get("save"):
                save = os.path.join(os.path.dirname(record_path), f"content.{request.queue_id}")
                with open(save, "wb") as f:
                    f.write(qf.read_content())
        finally:
            qf.close()
        _record(record_path, {
            "pid": os.getpid(), "transport": request.transport, "nexthop": request.nexthop,
            "queue_id": request.queue_id, "sender": sender, "rcpts": rcpts,
            "results": [r.result for r in results], "start": start, "end": time.time()})
        return results

    async def on_connection(conn):
        await agent.serve_connection(conn, handle)

    return child.serve(ctx, on_connection)


if __name__ == "__main__":
    sys.exit(main())
