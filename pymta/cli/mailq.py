"""mailq - list the mail queue (Postfix's mailq, i.e. `postqueue -p`)

SYNOPSIS
    mailq [-v] [-c config_dir | -C config_dir]

DESCRIPTION
    Prints the queue in the traditional layout: one block per message with
    its queue id (`*` active, `!` on hold), size, arrival time and sender,
    the recipients still to be delivered under their defer reasons, then
    `-- N Kbytes in M Requests.` or `Mail queue is empty`.  See postqueue(1),
    which does the work.
READS, WRITES
    queue_directory (read only).
SOCKETS
    None.
SECURITY
    Run as root or mail_owner (the queue directories are private).
PARAMETERS
    queue_directory hash_queue_depth
SEE ALSO
    postqueue(1), sendmail -bp, Postfix mailq(1)
"""

import getopt
import sys

from pymta.cli import postqueue
from pymta.core.errors import EX_USAGE


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts, args = getopt.getopt(argv, "c:C:v")
    except getopt.GetoptError:
        sys.stderr.write("mailq: fatal: usage: mailq [-v] [-c config_dir]\n")
        return EX_USAGE
    if args:
        sys.stderr.write("mailq: fatal: usage: mailq [-v] [-c config_dir]\n")
        return EX_USAGE
    forward = []
    for opt, value in opts:
        forward += ["-c", value] if opt in ("-c", "-C") else ["-v"]
    return postqueue.main(forward + ["-p"])


if __name__ == "__main__":
    sys.exit(main())
