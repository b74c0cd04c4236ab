"""pymta user - manage the virtual mailbox users in etc/users

SYNOPSIS
    pymta [-c DIR/etc] user add ADDRESS
    pymta [-c DIR/etc] user passwd ADDRESS
    pymta [-c DIR/etc] user del ADDRESS
    pymta [-c DIR/etc] user list

DESCRIPTION
    The users of the virtual mailbox domains live in the file named by
    virtual_mailbox_maps (passwd-file:$config_directory/users), one line per
    user in Dovecot's passwd-file format with an {ARGON2ID} hash.  The local
    delivery agent delivers their mail to
    $virtual_mailbox_base/<domain>/<localpart>/; pop3d and imapd log them in.

    add      adds a user; refuses an address that is already there.
    passwd   sets a new password.
    del      removes the user from the file.  The mailbox is kept (the
             command says where), so that no mail is lost by mistake.
    list     prints the addresses, one per line; entries whose password
             can never be verified are named on stderr.

    The password is read from stdin when stdin is not a terminal (its first
    line, without the line end), else prompted for twice without echo.  It
    is never taken from the command line.  Changes are atomic (temporary
    file, fsync, rename, fsync of the directory) and serialised with a lock,
    and take effect at once: servers re-read the file when it changes.

EXIT STATUS
    0 done; 64 bad address or usage; 65 unacceptable password (empty, too
    long, a line break or NUL) or the two passwords differ; 67 no such user
    (passwd, del); 73 the user exists (add); 78 configuration or users file
    problem.

READS, WRITES
    main.cf (virtual_mailbox_maps, virtual_mailbox_domains,
    virtual_mailbox_base); the users file.
SOCKETS
    None.
SECURITY
    Run by the administrator.  Passwords come from stdin or the terminal,
    never from arguments, and are never printed or logged.  The file keeps
    its mode (0640 or 0600) and owner.
PARAMETERS
    virtual_mailbox_maps virtual_mailbox_domains virtual_mailbox_base
SEE ALSO
    pymta/core/users.py, docs/auth.md
"""

import getpass
import os
import sys

import click

from pymta.core import config, maildir, users
from pymta.core.errors import (ConfigError, EX_CANTCREAT, EX_CONFIG, EX_DATAERR,
                               EX_NOUSER, EX_USAGE)

MAX_PASSWORD_INPUT = users.MAX_PASSWORD_LENGTH + 2     # with CR LF


def _fail(text, status):
    click.echo(f"pymta: fatal: {text}", err=True)
    raise SystemExit(status)


def _warn(text):
    click.echo(f"pymta: warning: {text}", err=True)


class _Setup:
    """What every subcommand needs: the users file and the mail layout."""

    def __init__(self, config_dir):
        try:
            cfg = config.load(config_dir)
        except ConfigError as e:
            _fail(str(e), EX_CONFIG)
        spec = cfg.virtual_mailbox_maps.strip()
        kind, sep, path = spec.partition(":")
        if not sep or kind != "passwd-file" or not path:
            _fail(f"virtual_mailbox_maps = {spec}: `pymta user` manages "
                  "passwd-file: tables only", EX_CONFIG)
        self.path = os.path.abspath(path)
        self.domains = [d.lower() for d in cfg.virtual_mailbox_domains]
        self.base = cfg.virtual_mailbox_base

    def mailbox(self, address):
        return maildir.virtual_mailbox_path(self.base, address)


def _read_password():
    """The new password: stdin's first line, or typed twice at a terminal."""
    if sys.stdin is None:
        _fail("no password: stdin is closed", EX_DATAERR)
    if not sys.stdin.isatty():
        raw = sys.stdin.buffer.readline(MAX_PASSWORD_INPUT + 1)
        if len(raw) > MAX_PASSWORD_INPUT:
            _fail(f"password longer than {users.MAX_PASSWORD_LENGTH} bytes",
                  EX_DATAERR)
        if raw.endswith(b"\n"):
            raw = raw[:-1]
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if not raw:
            _fail("empty password on stdin", EX_DATAERR)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            _fail("password on stdin is not UTF-8", EX_DATAERR)
    try:
        first = getpass.getpass("New password: ")
        second = getpass.getpass("Retype new password: ")
    except (EOFError, KeyboardInterrupt):
        click.echo("", err=True)
        _fail("no password given", EX_DATAERR)
    if first != second:
        _fail("the passwords do not match", EX_DATAERR)
    if not first:
        _fail("empty password", EX_DATAERR)
    return first


def _check_address(address):
    try:
        users.validate_address(address)
    except users.InvalidAddressError as e:
        _fail(str(e), EX_USAGE)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "config_dir", metavar="DIR",
              help="Configuration directory (else $MAIL_CONFIG, else /etc/pymta).")
@click.pass_context
def user(ctx, config_dir):
    """Manage the virtual mailbox users (etc/users)."""
    inherited = ctx.obj if isinstance(ctx.obj, str) else None
    ctx.obj = config.find_config_dir(config_dir or inherited)


@user.command()
@click.argument("address")
@click.pass_obj
def add(config_dir, address):
    """Add a user; the password comes from stdin or the terminal."""
    setup = _Setup(config_dir)
    _check_address(address)
    try:
        existing = users.read_users(setup.path).lookup(address)
    except users.UsersFileError as e:
        if os.path.exists(setup.path):
            _fail(str(e), EX_CONFIG)
        existing = None
    if existing is not None:
        _fail(f"user {existing.address} exists (line {existing.line})",
              EX_CANTCREAT)
    password = _read_password()
    try:
        entry = users.add_user(setup.path, address, password)
    except users.UserExistsError as e:
        _fail(str(e), EX_CANTCREAT)
    except users.UsersFileError as e:
        _fail(str(e), EX_CONFIG)
    except ValueError as e:
        _fail(str(e), EX_DATAERR)
    domain = entry.address.rpartition("@")[2].lower()
    if domain not in setup.domains:
        _warn(f"{domain} is not in virtual_mailbox_domains: mail for "
              f"{entry.address} is not delivered to its mailbox")
    click.echo(f"pymta: added user {entry.address}")


@user.command()
@click.argument("address")
@click.pass_obj
def passwd(config_dir, address):
    """Set a user's password; it comes from stdin or the terminal."""
    setup = _Setup(config_dir)
    _check_address(address)
    try:
        entry = users.read_users(setup.path).lookup(address)
    except users.UsersFileError as e:
        _fail(str(e), EX_CONFIG)
    if entry is None:
        _fail(f"no such user: {address}", EX_NOUSER)
    password = _read_password()
    try:
        entry = users.set_password(setup.path, address, password)
    except users.UnknownUserError as e:
        _fail(str(e), EX_NOUSER)
    except users.UsersFileError as e:
        _fail(str(e), EX_CONFIG)
    except ValueError as e:
        _fail(str(e), EX_DATAERR)
    click.echo(f"pymta: changed the password of {entry.address}")


@user.command(name="del")
@click.argument("address")
@click.pass_obj
def delete(config_dir, address):
    """Remove a user; the mailbox is kept."""
    setup = _Setup(config_dir)
    _check_address(address)
    try:
        entry = users.delete_user(setup.path, address)
    except users.UnknownUserError:
        _fail(f"no such user: {address}", EX_NOUSER)
    except users.UsersFileError as e:
        _fail(str(e), EX_CONFIG)
    box = setup.mailbox(entry.address)
    click.echo(f"pymta: removed user {entry.address}")
    if os.path.isdir(box):
        click.echo(f"pymta: the mailbox {box} is kept; remove it yourself "
                   "if it is no longer wanted")
    else:
        click.echo(f"pymta: {entry.address} has no mailbox ({box} does not exist)")


@user.command(name="list")
@click.pass_obj
def list_(config_dir):
    """Print the users, one address per line."""
    setup = _Setup(config_dir)
    try:
        found = users.read_users(setup.path)
    except users.UsersFileError as e:
        _fail(str(e), EX_CONFIG)
    for entry in found.entries.values():
        click.echo(entry.address)
    for line, reason in found.problems:
        _warn(f"{setup.path}, line {line}: {reason}")
