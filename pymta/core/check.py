"""Instance checks behind `pymta check` (Postfix's `postfix check`).

`check_instance(config_dir)` reads the configuration the way the programs
do and looks at what they need at start-up: main.cf and master.cf valid
(with every master.cf `-o` value typed in the context of main.cf), each
command present in daemon_directory and readable by the account that runs
it (the master runs it with this Python interpreter, so it need not be
executable), no two inet services on
one address and port, the instance directories present with safe modes, TLS
certificate and key usable and the key private, and, as root, mail_owner an
unprivileged account that owns the queue.  It returns a list of `Problem`s
and changes nothing: it creates no file, binds no socket (the master reports
a busy port itself when it binds) and never prints.

`validate_master(cfg, entries)` is the `-o` part on its own, for commands
(postconf) that load both files.
"""

import ipaddress
import os
import pwd
import re
import ssl
import stat
from dataclasses import dataclass

from pymta.core import config
from pymta.core.errors import ConfigError
from pymta.core.queue import DIR_MODES, Queue

SMTPD_TLS_LEVELS = ("none", "may", "encrypt")
RUN_SUBDIRS = {"public": None, "private": 0o700}   # None: any mode
KEY_MODES = (0o600, 0o400)
MAX_OWNER_REPORTS = 10
_WILDCARD = "*"


@dataclass(frozen=True)
class Problem:
    """One finding: severity is 'fatal' (the instance must not start) or
    'warning'; text names FILE:LINE first when the cause is in a file."""

    severity: str
    text: str

    def __str__(self):
        return f"{self.severity}: {self.text}"


def validate_master(cfg, entries):
    """Type-check every master.cf `-o name=value` as main.cf would.

    Raises ConfigError naming the master.cf line of the first bad setting."""
    for entry in entries:
        if not entry.overrides:
            continue
        explicit = dict(cfg.explicit)
        for name, value in entry.overrides.items():
            explicit[name] = (value, entry.file, entry.line)
        config.MainConfig(cfg.config_dir, explicit).validate()


def check_instance(config_dir=None):
    """Every problem found in the instance of `config_dir` (-c, else
    $MAIL_CONFIG, else /etc/pymta), in the order found."""
    config_dir = config.find_config_dir(config_dir)
    problems = []
    cfg = entries = None
    try:
        cfg = config.load(config_dir)
    except ConfigError as e:
        problems.append(Problem("fatal", str(e)))
    try:
        entries = config.load_master(config_dir)
    except ConfigError as e:
        problems.append(Problem("fatal", str(e)))
    if cfg is None:
        # Paths and modes depend on main.cf values that could not be read.
        return problems
    owner = _check_mail_owner(cfg, problems)
    if entries is not None:
        try:
            validate_master(cfg, entries)
        except ConfigError as e:
            problems.append(Problem("fatal", str(e)))
            entries = None
    if entries is not None:
        _check_commands(cfg, entries, owner, problems)
        _check_listeners(cfg, entries, problems)
    _check_directories(cfg, problems)
    _check_tls(cfg, entries or [], problems)
    if owner is not None:
        _check_queue_owner(cfg, owner, problems)
    return problems


def _where(cfg, name):
    """'FILE:LINE: ' when `name` is set in main.cf (or by -o), else ''."""
    file, line = cfg.where(name)
    if file and line:
        return f"{file}:{line}: "
    if file:
        return f"{file}: "
    return ""


def _fatal(problems, text):
    problems.append(Problem("fatal", text))


def _warning(problems, text):
    problems.append(Problem("warning", text))


# --- master.cf ------------------------------------------------------------------


def _check_commands(cfg, entries, owner, problems):
    """Each command is a file the master can hand to the interpreter, and
    that the account the service runs as (mail_owner when the master is
    root and the unpriv column is y) can read."""
    directory = cfg.daemon_directory
    if not os.path.isdir(directory):
        _fatal(problems, f"{_where(cfg, 'daemon_directory')}daemon_directory: {directory}: no such directory")
        return
    for entry in entries:
        path = os.path.join(directory, entry.command)
        where = f"{entry.file}:{entry.line}: service '{entry.name}/{entry.type}'"
        try:
            st = os.stat(path)
        except FileNotFoundError:
            _fatal(problems, f"{where}: command {path}: no such file")
            continue
        except OSError as e:
            _fatal(problems, f"{where}: command {path}: {e.strerror}")
            continue
        if not stat.S_ISREG(st.st_mode):
            _fatal(problems, f"{where}: command {path}: not a regular file")
        elif owner is not None and entry.unpriv:
            if not _readable_by(st, owner):
                _fatal(problems, f"{where}: command {path}: not readable by mail_owner {owner.pw_name}")
        elif not os.access(path, os.R_OK):
            _fatal(problems, f"{where}: command {path}: not readable")


def _readable_by(st, pw):
    """Whether a process with pw's uid and primary gid only (the master
    drops supplementary groups) may read a file with stat `st`."""
    if st.st_uid == pw.pw_uid:
        return bool(st.st_mode & stat.S_IRUSR)
    if st.st_gid == pw.pw_gid:
        return bool(st.st_mode & stat.S_IRGRP)
    return bool(st.st_mode & stat.S_IROTH)


def _bind_addresses(cfg, entry):
    """The addresses an inet service binds, {'*'} for the wildcard."""
    hosts = [entry.host] if entry.host else cfg.inet_interfaces
    out = set()
    for host in hosts:
        host = host.strip("[]").lower()
        if host in ("", "*", "all", "0.0.0.0", "::"):
            return {_WILDCARD}
        if host == "loopback-only":
            out.update(("127.0.0.1", "::1"))
            continue
        try:
            out.add(ipaddress.ip_address(host).compressed)
        except ValueError:
            out.add(host)       # a host name: compared by name, never resolved
    return out


def _unprivileged_port_start():
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start", encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 1024


def _check_listeners(cfg, entries, problems):
    seen = []
    low = _unprivileged_port_start() if os.geteuid() != 0 else 0
    for entry in entries:
        if entry.type != "inet":
            continue
        addresses = _bind_addresses(cfg, entry)
        for other, other_addresses in seen:
            if other.port != entry.port:
                continue
            if _WILDCARD in addresses or _WILDCARD in other_addresses or addresses & other_addresses:
                _fatal(problems, f"{entry.file}:{entry.line}: service '{entry.name}/inet' uses port "
                                 f"{entry.port} of service '{other.name}/inet' (line {other.line}) "
                                 f"on the same address")
                break
        seen.append((entry, addresses))
        if entry.port < low:
            _warning(problems, f"{entry.file}:{entry.line}: service '{entry.name}/inet': port {entry.port} "
                               f"is privileged; only a master started as root can bind it")


# --- directories and modes -------------------------------------------------------


def _need_directory(cfg, name, path, problems):
    """True when `path` (from parameter `name`) is a directory."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        _fatal(problems, f"{_where(cfg, name)}{name}: {path}: no such directory")
        return False
    except OSError as e:
        _fatal(problems, f"{_where(cfg, name)}{name}: {path}: {e.strerror}")
        return False
    if not stat.S_ISDIR(st.st_mode):
        _fatal(problems, f"{_where(cfg, name)}{name}: {path}: not a directory")
        return False
    return True


def _check_directories(cfg, problems):
    queue_dir = cfg.queue_directory
    if _need_directory(cfg, "queue_directory", queue_dir, problems):
        try:
            queue = Queue(queue_dir, cfg.hash_queue_depth)
        except ValueError as e:
            _fatal(problems, f"{_where(cfg, 'hash_queue_depth')}{e}")
        else:
            # Modes as queue.py makes them: incoming active deferred hold
            # corrupt defer bounce 0700, maildrop 1733.
            for text in queue.check_dirs():
                _fatal(problems, f"queue_directory: {text}")
    run_dir = cfg.run_directory
    if _need_directory(cfg, "run_directory", run_dir, problems):
        for sub, mode in RUN_SUBDIRS.items():
            path = os.path.join(run_dir, sub)
            if _need_directory(cfg, "run_directory", path, problems) and mode is not None:
                _check_mode(path, mode, problems)
    _need_directory(cfg, "virtual_mailbox_base", cfg.virtual_mailbox_base, problems)
    if cfg.maillog_file:
        _need_directory(cfg, "maillog_file", os.path.dirname(os.path.abspath(cfg.maillog_file)), problems)


def _check_mode(path, want, problems):
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode != want:
        _fatal(problems, f"{path}: mode {mode:04o}, expected {want:04o}")


# --- TLS ----------------------------------------------------------------------------


class _EncryptedKey(Exception):
    """The private key asks for a passphrase, which no service can type."""


def _passphrase():
    raise _EncryptedKey()


def _tls_settings(cfg, entries):
    """[(cfg, where)] for main.cf and each service that overrides smtpd_tls_*."""
    out = [(cfg, "")]
    for entry in entries:
        if any(name.startswith("smtpd_tls_") for name in entry.overrides):
            out.append((cfg.with_overrides(entry.overrides, source=entry.file),
                        f"{entry.file}:{entry.line}: service '{entry.name}/{entry.type}': "))
    return out


def _check_tls(cfg, entries, problems):
    needed = {}     # (cert, key) -> reason they are needed
    keys = []
    for scfg, where in _tls_settings(cfg, entries):
        level = scfg.smtpd_tls_security_level
        if level not in SMTPD_TLS_LEVELS:
            where = where or _where(cfg, "smtpd_tls_security_level")
            _fatal(problems, f"{where}smtpd_tls_security_level: unknown level '{level}' "
                             f"(use {', '.join(SMTPD_TLS_LEVELS)})")
            continue
        pair = (scfg.smtpd_tls_cert_file, scfg.smtpd_tls_key_file)
        if pair[1] not in keys:
            keys.append(pair[1])
        if level != "none" or scfg.smtpd_tls_wrappermode:
            why = "smtpd_tls_wrappermode = yes" if scfg.smtpd_tls_wrappermode else f"smtpd_tls_security_level = {level}"
            needed.setdefault(pair, (where, why))
    for key in keys:
        _check_key_mode(key, problems)
    for (cert, key), (where, why) in needed.items():
        missing = False
        for name, path in (("smtpd_tls_cert_file", cert), ("smtpd_tls_key_file", key)):
            if not os.path.isfile(path):
                _fatal(problems, f"{where or _where(cfg, name)}{name}: {path}: no such file (needed with {why})")
                missing = True
        if not missing:
            _check_cert_and_key(cert, key, problems)


def _check_key_mode(key, problems):
    try:
        st = os.stat(key)
    except FileNotFoundError:
        return
    except OSError as e:
        _warning(problems, f"{key}: {e.strerror}")
        return
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        _fatal(problems, f"{key}: mode {mode:04o}: the private key is readable by group or others (use 0600 or 0400)")
    elif mode not in KEY_MODES:
        _warning(problems, f"{key}: mode {mode:04o}, expected 0600 or 0400")


def _check_cert_and_key(cert, key, problems):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=_passphrase)
    except _EncryptedKey:
        _fatal(problems, f"{key}: the private key is protected by a passphrase; the services cannot use it")
    except PermissionError as e:
        _warning(problems, f"{e.filename or key}: cannot read: {e.strerror}")
    except ssl.SSLError as e:
        reason = re.sub(r"\s*\(_ssl\.c:\d+\)$", "", str(e.args[-1]))
        _fatal(problems, f"{cert}, {key}: not a usable certificate and key: {reason}")
    except OSError as e:
        _fatal(problems, f"{cert}, {key}: {e.strerror}")


# --- accounts and owners -------------------------------------------------------------


def _check_mail_owner(cfg, problems):
    """As root: the pwd entry of mail_owner (None when unusable or not root)."""
    if os.geteuid() != 0:
        return None
    name = cfg.mail_owner
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        _fatal(problems, f"{_where(cfg, 'mail_owner')}mail_owner: no such user '{name}' "
                         f"(create it: useradd --system {name})")
        return None
    if pw.pw_uid == 0:
        _fatal(problems, f"{_where(cfg, 'mail_owner')}mail_owner: '{name}' has uid 0; "
                         f"the services must run unprivileged")
        return None
    return pw


def _check_queue_owner(cfg, owner, problems):
    """Queue directories and files must belong to mail_owner; files in
    maildrop/ belong to the users who posted them."""
    top = cfg.queue_directory
    wrong = []
    for name in DIR_MODES:
        start = os.path.join(top, name)
        if not os.path.isdir(start):
            continue
        for directory, dirnames, filenames in os.walk(start):
            _owner_of(directory, owner.pw_uid, wrong)
            if name == "maildrop":
                break           # flat; its files belong to the users who posted them
            for entry in filenames + [d for d in dirnames if os.path.islink(os.path.join(directory, d))]:
                _owner_of(os.path.join(directory, entry), owner.pw_uid, wrong)
    for path, uid, is_dir in wrong[:MAX_OWNER_REPORTS]:
        text = f"{path}: owned by {_user_name(uid)}, not by mail_owner {owner.pw_name}"
        # A directory the services cannot write stops the queue; a file
        # only stops its own message.
        problems.append(Problem("fatal" if is_dir else "warning", text))
    if len(wrong) > MAX_OWNER_REPORTS:
        _warning(problems, f"{top}: {len(wrong) - MAX_OWNER_REPORTS} more queue entries "
                           f"not owned by mail_owner {owner.pw_name}")


def _owner_of(path, uid, wrong):
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return      # removed by a running service while we walked
    if st.st_uid != uid:
        wrong.append((path, st.st_uid, stat.S_ISDIR(st.st_mode)))


def _user_name(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"
