"""The W4 POP3 client, the same against Dovecot and pymta (poplib):

    python -m tests.bench.popclient HOST PORT USER PASSWORD EXPECTED

One session: connect, USER/PASS, STAT, UIDL, RETR of every message, QUIT.
Prints one JSON line: the session's wall seconds (from connect to the
answer to QUIT), this process's CPU seconds in that span, the message
count and bytes retrieved.  Exits 1, with the reason on stderr, when the
server refuses something or the mailbox does not hold EXPECTED messages.
Every read has a 60 s time limit.
"""

import json
import poplib
import sys
import time


def session(host, port, user, password, expected):
    t0, c0 = time.perf_counter(), time.process_time()
    pop = poplib.POP3(host, port, timeout=60)
    try:
        pop.user(user)
        pop.pass_(password)
        count, _size = pop.stat()
        if count != expected:
            raise poplib.error_proto(f"STAT says {count} messages, expected {expected}")
        _resp, uidls, _octets = pop.uidl()
        if len(uidls) != count:
            raise poplib.error_proto(f"UIDL listed {len(uidls)} messages, STAT {count}")
        total = 0
        for n in range(1, count + 1):
            _resp, lines, octets = pop.retr(n)
            total += octets
        pop.quit()
    finally:
        pop.close()
    return {"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0,
            "messages": count, "bytes": total}


def main(argv):
    host, port, user, password, expected = argv
    try:
        result = session(host, int(port), user, password, int(expected))
    except (poplib.error_proto, OSError) as e:
        sys.stderr.write(f"popclient: {e}\n")
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
