"""qmgr - the pymta queue manager

SYNOPSIS
    libexec/qmgr -c config_dir -n qmgr -t unix   (started by the master)

DESCRIPTION
    qmgr is the single owner of the active queue and of scheduling, like
    Postfix's qmgr(8).  It moves messages from incoming/ (new mail) and
    deferred/ (retries whose time has come) into active/, resolves each
    recipient to a transport and next hop (transport.py), and hands the
    recipients to the delivery agents over persistent connections to
    $run_directory/private/<transport> (docs/delivery-protocol.md), several
    at once, within per-transport and per-destination concurrency limits
    (schedule.py).

    It reads only the envelope of a message (the queue file's envelope is at
    a known offset, after the content); the content is read by the agents,
    and by qmgr itself only to quote it in a bounce.

    Results: a sent recipient is marked done in the queue file (one byte);
    a bounced one goes to the message's bounce log and is marked done; a
    deferred one goes to its defer log.  When a delivery attempt is over,
    bounced recipients get one RFC 3464 notice (bounce.py), a message with
    deferred recipients moves to deferred/ with its next attempt time
    (exponential backoff between minimal_backoff_time and
    maximal_backoff_time, doubling with the message's age) as the file's
    mtime, or is bounced once it is older than maximal_queue_lifetime
    (bounce_queue_lifetime for notifications); a finished message is
    removed.  The sender of a message still deferred after
    delay_warning_time is warned once.  hold/ is never touched.

    Wake-ups come as one-byte triggers on public/qmgr (pymta/core/trigger.py):
    I scan incoming, D scan deferred, A ignore next-attempt times (D A is
    `postqueue -f`), F retry dead transports, W the master's timer.  Besides,
    incoming is scanned every minute and deferred every queue_run_delay, so a
    lost trigger only delays mail.

    Crashes: every state change is one file-system operation, so after a
    crash (kill -9 included) the message is in incoming/, active/ or
    deferred/.  At start qmgr takes over whatever active/ holds and tries
    it again: a recipient whose delivery finished just before the crash,
    but whose done mark was not yet written, is delivered a second time.
    That is the only duplicate pymta allows (as Postfix).

READS, WRITES
    queue_directory: incoming, active, deferred (moves, mtimes, done marks),
    defer and bounce logs, corrupt (damaged files); new notifications in
    incoming.
SOCKETS
    Serves public/qmgr (triggers); connects to private/<transport>.
SECURITY
    Runs as mail_owner.  Queue files are written by pymta's own programs,
    but are parsed with limits all the same (damaged ones go to corrupt/);
    agent replies are checked recipient by recipient; nothing from a message
    reaches a shell or a file name.
PARAMETERS
    queue_directory run_directory hash_queue_depth queue_run_delay
    minimal_backoff_time maximal_backoff_time maximal_queue_lifetime
    bounce_queue_lifetime delay_warning_time qmgr_message_active_limit
    default_destination_concurrency_limit local_destination_concurrency_limit
    smtp_destination_concurrency_limit default_process_limit ipc_timeout
    mydestination virtual_mailbox_domains transport_maps relayhost
    default_transport recipient_delimiter myhostname myorigin
    bounce_notice_recipient notify_classes bounce_size_limit header_size_limit
SEE ALSO
    docs/delivery-protocol.md, docs/queue.md, postqueue(1), postsuper(1),
    Postfix qmgr(8)
"""

import resource
import sys

from pymta.core import config, log
from pymta.core.errors import ConfigError, EX_CONFIG
from pymta.core.queue import Queue
from pymta.core.runtime import child
from pymta.services.qmgr.bounce import Notifier, cleanup_submitter
from pymta.services.qmgr.scan import Scanner
from pymta.services.qmgr.schedule import Scheduler
from pymta.services.qmgr.transport import Resolver

FD_RESERVE = 1000       # descriptors kept for agent connections, logs, scans


def active_limit(cfg):
    """qmgr_message_active_limit, bounded by the open files this process
    may have (each active message keeps its queue file open)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            log.warning(f"cannot raise the open file limit to {hard}: {e}")
    wanted = max(1, cfg.qmgr_message_active_limit)
    if soft == resource.RLIM_INFINITY:
        return wanted
    room = max(1, soft - FD_RESERVE)
    if room < wanted:
        log.verbose(f"qmgr_message_active_limit {wanted} reduced to {room}: "
                    f"the open file limit is {soft}")
    return min(wanted, room)


def main(argv=None):
    ctx = child.start("qmgr", argv)
    cfg = ctx.cfg
    try:
        services = config.load_master(ctx.config_dir)
        queue = Queue(cfg.queue_directory, cfg.hash_queue_depth)
        resolver = Resolver(cfg)
    except (ConfigError, ValueError) as e:
        log.fatal(f"{e}", status=EX_CONFIG)
    notifier = Notifier(cfg, cleanup_submitter(cfg, queue))
    scheduler = Scheduler(cfg, queue, Scanner(queue), resolver, notifier, services,
                          active_limit(cfg))

    return child.serve(ctx, None, main=scheduler.run, long_running=True,
                       on_trigger=scheduler.trigger)


if __name__ == "__main__":
    sys.exit(main())
