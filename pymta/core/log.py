"""Logging in Postfix's line format.

    Nov 22 10:00:00 host pymta/smtpd[1234]: 4XyZ...: client=...

Lines go to `maillog_file` (appended with one write per line, so lines of
concurrent processes never interleave) or, when it is empty, to syslog with
the ident `$syslog_name/program`.  Warnings, errors and fatal errors carry
Postfix's prefixes ("warning: ", "error: ", "fatal: ").  A process that runs
in the foreground may also copy every line to stderr.
"""

import os
import sys
import syslog
import time

_state = {
    "tag": "pymta",
    "host": "localhost",
    "fd": None,
    "path": None,
    "stderr": False,
    "syslog": False,
    "verbose": False,
    "pid": None,            # os.getpid() once per process, not per line
    "stamp": (None, ""),    # (second, "Nov 22 10:00:00"): one strftime a second
}


def _forget_pid():
    _state["pid"] = None


os.register_at_fork(after_in_child=_forget_pid)


def _stamp():
    now = int(time.time())
    second, text = _state["stamp"]
    if second != now:
        text = time.strftime("%b %e %H:%M:%S", time.localtime(now))
        _state["stamp"] = (now, text)
    return text


def setup(program, cfg=None, stderr=False, verbose=False, tag=None):
    """Start logging for this process as `$syslog_name/program`.

    `tag` replaces the whole program tag (the submission services log as
    `pymta/submission/smtpd`)."""
    name = cfg.syslog_name if cfg is not None else "pymta"
    _state["tag"] = tag or f"{name}/{program}"
    _state["host"] = cfg.myhostname if cfg is not None else "localhost"
    _state["stderr"] = stderr
    _state["verbose"] = verbose
    path = cfg.maillog_file if cfg is not None else ""
    close()
    if path:
        _state["path"] = path
        try:
            _state["fd"] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as e:
            _state["fd"] = None
            sys.stderr.write(f"{_state['tag']}: warning: cannot open log file {path}: {e.strerror}\n")
            _state["stderr"] = True
    elif cfg is not None:
        _state["syslog"] = True
        syslog.openlog(_state["tag"], syslog.LOG_PID, syslog.LOG_MAIL)


def close():
    if _state["fd"] is not None:
        os.close(_state["fd"])
        _state["fd"] = None
    _state["syslog"] = False


def reopen():
    """Reopen the log file (after rotation)."""
    path = _state["path"]
    if path and _state["fd"] is not None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        os.close(_state["fd"])
        _state["fd"] = fd


def _emit(priority, text):
    text = text.replace("\n", " ").replace("\r", " ")
    if _state["syslog"]:
        syslog.syslog(priority, text)
    pid = _state["pid"]
    if pid is None:
        pid = _state["pid"] = os.getpid()
    line = f"{_stamp()} {_state['host']} {_state['tag']}[{pid}]: {text}\n"
    data = line.encode("utf-8", "backslashreplace")
    if _state["fd"] is not None:
        try:
            os.write(_state["fd"], data)
        except OSError:
            # The log is gone (disk full, removed): keep serving mail; the
            # line still reaches stderr when that is being watched.
            _state["stderr"] = True
    if _state["stderr"] or (_state["fd"] is None and not _state["syslog"]):
        try:
            sys.stderr.write(f"{_state['tag']}: {text}\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            # stderr closed (a detached daemon): the log file has the line.
            return


def info(text):
    _emit(syslog.LOG_INFO, text)


def verbose(text):
    if _state["verbose"]:
        _emit(syslog.LOG_DEBUG, text)


def warning(text):
    _emit(syslog.LOG_WARNING, "warning: " + text)


def error(text):
    _emit(syslog.LOG_ERR, "error: " + text)


def fatal(text, status=1):
    """Log and exit with a non-zero status."""
    _emit(syslog.LOG_CRIT, "fatal: " + text)
    raise SystemExit(status)


def panic(text):
    """An internal inconsistency: log and exit."""
    _emit(syslog.LOG_CRIT, "panic: " + text)
    raise SystemExit(2)


def current_fd():
    """The log file descriptor (a daemonizing master keeps it open)."""
    return _state["fd"]
