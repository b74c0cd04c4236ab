"""pymta dedup - remove duplicate copies of messages from a mailbox

SYNOPSIS
    pymta [-c DIR/etc] dedup [--apply] ADDRESS

DESCRIPTION
    pymta never acknowledges a message it has not stored, so a crash between
    a delivery and its bookkeeping can, at worst, deliver one message twice
    (docs/queue.md).  This command finds messages of a virtual mailbox
    ($virtual_mailbox_base/<domain>/<localpart>/) that are byte-for-byte
    copies of each other and, with --apply, deletes all but one of
    each set.  Without --apply it only reports what it would delete.

    The work is done by `mdedup` from the mail-deduplicate package (GPL-2.0+),
    run with exact-match thresholds so that messages which merely share
    headers are never touched.
READS, WRITES
    The user's Maildir (with --apply: deletes duplicate files).
SOCKETS
    None.
SECURITY
    Run by the operator (root or mail_owner).  The address is checked
    against the users file before it becomes a path.
SEE ALSO
    mdedup --help, docs/maildir.md
"""

import os
import subprocess
import sys

import click

from pymta.core import config, users
from pymta.core.maildir import virtual_mailbox_path
from pymta.core.errors import ConfigError, EX_CONFIG, EX_NOUSER, EX_UNAVAILABLE


def mdedup_command(maildir, apply):
    exe = os.path.join(os.path.dirname(sys.executable), "mdedup")
    argv = [exe, "--no-config", "--no-color", "--no-progress",
            "--input-format", "maildir",
            "--strategy", "discard-all-but-one",
            "--size-threshold", "0", "--content-threshold", "0",
            "--hash-body", "raw",
            "--action", "delete-discarded"]
    if not apply:
        argv.append("--dry-run")
    return argv + [maildir]


@click.command()
@click.option("--apply", is_flag=True, help="Delete the duplicates (default: only report).")
@click.argument("address")
@click.pass_obj
def dedup(config_dir, apply, address):
    """Remove exact duplicate messages from ADDRESS's mailbox."""
    try:
        cfg = config.load(config_dir)
    except ConfigError as e:
        click.echo(f"pymta: fatal: {e}", err=True)
        raise SystemExit(EX_CONFIG) from None
    entry = users.read_users(os.path.join(cfg.config_dir, "users")).lookup(address)
    if entry is None:
        click.echo(f"pymta: fatal: unknown user {address}", err=True)
        raise SystemExit(EX_NOUSER)
    maildir = virtual_mailbox_path(cfg.virtual_mailbox_base, entry.address)
    if not os.path.isdir(os.path.join(maildir, "cur")):
        click.echo(f"pymta: {entry.address}: no mailbox yet ({maildir})")
        return
    argv = mdedup_command(maildir, apply)
    if not os.path.exists(argv[0]):
        click.echo(f"pymta: fatal: {argv[0]} not found (pip install mail-deduplicate)", err=True)
        raise SystemExit(EX_UNAVAILABLE)
    status = subprocess.call(argv)
    raise SystemExit(status)
