"""Starting a service process: fork, arrange file descriptors, drop
privileges, exec.  No shell is involved.

The child gets fd 3 (status pipe), fd 4 (lifeline) and fds 5.. (listening
sockets), stdin from /dev/null, and the environment of `import_environment`
plus PYMTA_* variables.  When the master runs as root and the service's
unpriv column is y, the child becomes mail_owner before exec, so no service
code runs as root.
"""

import fcntl
import os
import sys

from pymta.core.runtime import LIFELINE_FD, LISTEN_FD, STATUS_FD


def child_environment(cfg, generation, nsocks):
    env = {}
    for item in cfg.import_environment:
        name, sep, value = item.partition("=")
        if sep:
            env[name] = value
        elif name in os.environ:
            env[name] = os.environ[name]
    env["MAIL_CONFIG"] = cfg.config_dir
    env["PYMTA_MASTER"] = "1"
    env["PYMTA_GENERATION"] = str(generation)
    env["PYMTA_LISTEN_FDS"] = str(nsocks)
    return env


def command_path(cfg, command):
    """A command is relative to daemon_directory unless it is absolute."""
    return os.path.join(cfg.daemon_directory, command)


def spawn(cfg, entry, status_w, lifeline_r, socks, generation, creds):
    """Fork and exec one process of a service; return its pid.

    creds is (uid, gid) to switch to, or None to keep the master's."""
    path = command_path(cfg, entry.command)
    argv = [sys.executable, path, "-c", cfg.config_dir, "-n", entry.name, "-t", entry.type]
    for name, value in entry.overrides.items():
        argv += ["-o", f"{name}={value}"]
    argv += entry.args
    env = child_environment(cfg, generation, len(socks))
    pid = os.fork()
    if pid:
        return pid
    # Child: nothing here may raise past os._exit.
    try:
        wanted = [status_w, lifeline_r] + [s.fileno() for s in socks]
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 256) for fd in wanted]
        for i, fd in enumerate(high):
            os.dup2(fd, STATUS_FD + i, inheritable=True)
        assert LIFELINE_FD == STATUS_FD + 1 and LISTEN_FD == STATUS_FD + 2
        os.closerange(STATUS_FD + len(wanted), 65536)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        if creds is not None:
            uid, gid = creds
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
        os.execve(sys.executable, argv, env)
    except BaseException as e:     # noqa: BLE001 - report and leave the fork
        try:
            os.write(2, f"pymta/master: fatal: exec {path}: {e}\n".encode())
        finally:
            os._exit(127)
