"""wakeups - a test service that appends every trigger it receives to a file.

Used to test the master.cf wakeup column; the file is its first argument.
"""

import sys

from pymta.core.runtime import child


def main():
    ctx = child.start("wakeups")
    path = ctx.extra_args[0]

    async def handle(conn):
        data = await child.read_trigger(conn)
        with open(path, "ab") as f:
            f.write(data + b"\n")

    child.serve(ctx, handle, long_running=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
