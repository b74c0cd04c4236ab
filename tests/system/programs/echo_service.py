"""echo - a tiny service for testing the master and the runtime skeleton.

It greets each client with `hello <pid>` and echoes lines back until EOF or
`quit`.  It lives under tests/ because it is not a mail service; master.cf
lines in tests name it by absolute path.
"""

import os
import sys

from pymta.core import log
from pymta.core.runtime import child


async def handle(conn):
    conn.writer.write(b"hello %d\n" % os.getpid())
    await conn.writer.drain()
    while True:
        line = await conn.reader.readline()
        if not line or line.strip() == b"quit":
            break
        conn.writer.write(line)
        await conn.writer.drain()


def main():
    ctx = child.start("echo")
    if "fail-at-start" in ctx.extra_args:
        log.fatal("asked to fail at start")
    child.serve(ctx, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
