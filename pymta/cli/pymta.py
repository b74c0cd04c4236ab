"""pymta - create, start, stop and inspect a pymta instance

SYNOPSIS
    pymta init DIR [--hostname H] [--domain D] [--listen ADDR] [--port-offset N]
    pymta [-c DIR/etc] start [--foreground] | stop | reload | status | check | flush
    pymta [-c DIR/etc] user add|passwd|del|list [ADDRESS]
    pymta [-c DIR/etc] dedup [--apply] ADDRESS

DESCRIPTION
    init     makes a self-contained instance in DIR: etc/ (main.cf, master.cf,
             aliases, users, tls/ with a self-signed certificate), spool/,
             mail/, log/ and run/.  It refuses to touch an existing instance.
    start    starts the master (detached; --foreground for systemd) once the
             configuration is valid and every port could be bound.
    stop     SIGTERM to the master, then waits until it is gone.
    reload   SIGHUP to the master: re-read the configuration.
    status   exit 0 when the master runs, 1 otherwise.
    check    validates configuration, paths, modes and owners.
    flush    asks qmgr to retry every deferred message now.
    user     manages the virtual mailbox users in etc/users.
    dedup    removes exact duplicate messages from a mailbox (mdedup).

READS, WRITES
    The instance directories; run_directory/master.pid (read).
SOCKETS
    flush: a trigger to run_directory/public/qmgr.
SECURITY
    init as root gives the spool, mail and log directories to mail_owner.
    Passwords are read from stdin (never from the command line) and never
    logged.
SEE ALSO
    docs/admin.md, master (libexec/master)
"""

import os
import pwd
import signal
import subprocess
import sys
import time

import click

from pymta.core import config
from pymta.core.errors import ConfigError, EX_CONFIG, EX_UNAVAILABLE, EX_USAGE

TOP = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
TEMPLATES = os.path.join(TOP, "etc")

DEFAULT_PORTS = {
    "SMTP": 2525, "SUBMISSION": 2587, "SUBMISSIONS": 2465,
    "POP3": 2110, "POP3S": 2995, "IMAP": 2143, "IMAPS": 2993,
}


def _fail(text, status=1):
    click.echo(f"pymta: fatal: {text}", err=True)
    raise SystemExit(status)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "config_dir", metavar="DIR", help="Configuration directory (else $MAIL_CONFIG, else /etc/pymta).")
@click.pass_context
def cli(ctx, config_dir):
    """Manage a pymta instance."""
    ctx.obj = config.find_config_dir(config_dir)


def _load(config_dir):
    try:
        return config.load(config_dir)
    except ConfigError as e:
        _fail(str(e), EX_CONFIG)


def _load_for_control(config_dir):
    """The configuration for status and stop: a mistake made in main.cf
    since the start must not keep an operator from stopping the master."""
    try:
        return config.load(config_dir)
    except ConfigError as e:
        try:
            cfg = config.load(config_dir, validate=False)
            cfg.run_directory
            click.echo(f"pymta: warning: {e}", err=True)
            return cfg
        except (ConfigError, ValueError):
            _fail(str(e), EX_CONFIG)


# --- init -------------------------------------------------------------------------

def _fill(template, values):
    with open(os.path.join(TEMPLATES, template), encoding="utf-8") as f:
        text = f.read()
    for key, value in values.items():
        text = text.replace(f"@{key}@", str(value))
    return text


def _write(path, text, mode):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, mode)


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--hostname", default=None, help="myhostname (default: this host's name).")
@click.option("--domain", default=None, help="mydomain (default: hostname minus its first label).")
@click.option("--listen", default="127.0.0.1", show_default=True, help="Address the services listen on.")
@click.option("--port-offset", default=0, type=click.IntRange(0, 60000), show_default=True, help="Added to every default port.")
def init(directory, hostname, domain, listen, port_offset):
    """Create a new instance in DIRECTORY."""
    from pymta.core.queue import Queue
    from pymta.core.tls import make_self_signed

    top = os.path.abspath(directory)
    etc = os.path.join(top, "etc")
    if os.path.exists(os.path.join(etc, "main.cf")) or os.path.exists(os.path.join(top, "spool")):
        _fail(f"{top} already holds an instance; not overwriting it", EX_USAGE)
    hostname = hostname or _default_hostname()
    if domain is None:
        domain = hostname.split(".", 1)[1] if "." in hostname else "localdomain"
    ports = {k: v + port_offset for k, v in DEFAULT_PORTS.items()}
    if max(ports.values()) > 65535:
        _fail(f"--port-offset {port_offset} puts ports beyond 65535", EX_USAGE)
    values = {"HOSTNAME": hostname, "DOMAIN": domain, "LISTEN": f"[{listen}]" if ":" in listen else listen}
    values.update({f"PORT_{k}": v for k, v in ports.items()})

    owner = None
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("pymta")
            owner = (pw.pw_uid, pw.pw_gid)
        except KeyError:
            click.echo("pymta: warning: account 'pymta' (mail_owner) does not exist; "
                       "create it before start: useradd --system pymta", err=True)
    os.makedirs(top, mode=0o755, exist_ok=True)
    os.makedirs(os.path.join(etc, "tls"), mode=0o755)
    os.chmod(os.path.join(etc, "tls"), 0o755)
    _write(os.path.join(etc, "main.cf"), _fill("main.cf", values), 0o644)
    _write(os.path.join(etc, "master.cf"), _fill("master.cf", values), 0o644)
    _write(os.path.join(etc, "aliases"), _fill("aliases", values), 0o644)
    _write(os.path.join(etc, "users"), "# user@domain:{ARGON2ID}hash::::::  (manage with `pymta user`)\n", 0o640)
    cert, key = os.path.join(etc, "tls", "cert.pem"), os.path.join(etc, "tls", "key.pem")
    make_self_signed(hostname, cert, key)
    os.chmod(cert, 0o644)

    for sub, mode in (("mail", 0o700), ("log", 0o755), ("run", 0o755)):
        os.makedirs(os.path.join(top, sub), mode=mode)
        os.chmod(os.path.join(top, sub), mode)
    os.makedirs(os.path.join(top, "run", "public"), mode=0o711)
    os.makedirs(os.path.join(top, "run", "private"), mode=0o700)
    log_file = os.path.join(top, "log", "maillog")
    _write(log_file, "", 0o640)
    queue = Queue(os.path.join(top, "spool"))
    queue.create_dirs(*(owner or (None, None)))
    if owner:
        for path in (os.path.join(top, "mail"), log_file, os.path.join(top, "run", "private"), key):
            os.chown(path, *owner)
        os.chown(os.path.join(etc, "users"), 0, owner[1])

    click.echo(f"pymta: created instance {top}")
    click.echo(f"  hostname {hostname}, domain {domain}, listening on {listen}")
    click.echo(f"  smtp {ports['SMTP']}  submission {ports['SUBMISSION']}  submissions {ports['SUBMISSIONS']}")
    click.echo(f"  pop3 {ports['POP3']}  pop3s {ports['POP3S']}  imap {ports['IMAP']}  imaps {ports['IMAPS']}")
    click.echo(f"  start it:  pymta -c {etc} start")


def _default_hostname():
    import socket
    name = socket.getfqdn() or socket.gethostname() or "localhost"
    return name if "." in name else f"{name}.localdomain"


# --- start, stop, reload, status --------------------------------------------------

def _master_path(cfg):
    return os.path.join(cfg.daemon_directory, "master")


def _running_pid(cfg):
    """The master's pid if one runs for this instance (its pid file is locked)."""
    import fcntl
    path = os.path.join(cfg.run_directory, "master.pid")
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@cli.command()
@click.option("--foreground", is_flag=True, help="Stay in the foreground (systemd Type=simple); log to stderr too.")
@click.option("-v", "verbose", is_flag=True, help="Verbose logging.")
@click.pass_obj
def start(config_dir, foreground, verbose):
    """Start the mail system."""
    cfg = _load(config_dir)
    _check_or_fail(config_dir)
    pid = _running_pid(cfg)
    if pid:
        _fail(f"the pymta mail system is already running (pid {pid})", EX_UNAVAILABLE)
    argv = [sys.executable, _master_path(cfg), "-c", config_dir] + (["-v"] if verbose else [])
    if foreground:
        os.execv(sys.executable, argv + ["-f"])
    status = subprocess.call(argv)
    if status != 0:
        raise SystemExit(status)
    for _ in range(100):
        if _running_pid(cfg):
            break
        time.sleep(0.05)
    click.echo(f"pymta: starting the pymta mail system (configuration {config_dir})", err=True)


@cli.command()
@click.pass_obj
def stop(config_dir):
    """Stop the mail system."""
    cfg = _load_for_control(config_dir)
    pid = _running_pid(cfg)
    if not pid or pid < 0:
        _fail("the pymta mail system is not running", 1)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + cfg.master_drain_time + 10
    while time.monotonic() < deadline:
        if not _running_pid(cfg):
            click.echo("pymta: stopping the pymta mail system", err=True)
            return
        time.sleep(0.05)
    _fail(f"the master (pid {pid}) did not stop", 1)


@cli.command()
@click.pass_obj
def reload(config_dir):
    """Re-read the configuration (SIGHUP to the master)."""
    cfg = _load(config_dir)
    _check_or_fail(config_dir)
    pid = _running_pid(cfg)
    if not pid or pid < 0:
        _fail("the pymta mail system is not running", 1)
    os.kill(pid, signal.SIGHUP)
    click.echo("pymta: refreshing the pymta mail system", err=True)


@cli.command()
@click.pass_obj
def status(config_dir):
    """Exit 0 if the master runs, 1 if not."""
    cfg = _load_for_control(config_dir)
    pid = _running_pid(cfg)
    if pid:
        click.echo(f"pymta: the pymta mail system is running: PID: {pid}")
        return
    click.echo("pymta: the pymta mail system is not running", err=True)
    raise SystemExit(1)


def _check_or_fail(config_dir):
    from pymta.core.check import check_instance
    problems = check_instance(config_dir)
    fatal = False
    for p in problems:
        click.echo(f"pymta/check: {p.severity}: {p.text}", err=True)
        fatal = fatal or p.severity == "fatal"
    if fatal:
        raise SystemExit(EX_CONFIG)


@cli.command()
@click.pass_obj
def check(config_dir):
    """Validate configuration, paths, modes and owners."""
    _check_or_fail(config_dir)


@cli.command()
@click.pass_obj
def flush(config_dir):
    """Retry every deferred message now (as postqueue -f)."""
    from pymta.core import trigger
    cfg = _load(config_dir)
    # Postfix's flush: retry dead destinations, ignore next-attempt times,
    # scan deferred and incoming.
    request = trigger.FLUSH_DEAD + trigger.IGNORE_TIME + trigger.SCAN_DEFERRED + trigger.SCAN_INCOMING
    if not trigger.send_trigger(trigger.qmgr_socket(cfg), request):
        _fail("cannot flush the queue: the mail system is not running (qmgr socket unavailable)", EX_UNAVAILABLE)


def _add_user_commands():
    from pymta.cli.dedup import dedup
    from pymta.cli.user import user
    cli.add_command(user)
    cli.add_command(dedup)


_add_user_commands()


def main(argv=None):
    return cli.main(args=argv, prog_name="pymta", standalone_mode=True)
