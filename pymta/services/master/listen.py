"""Listening sockets the master creates for master.cf services.

inet services listen on the address of their master.cf name, or on every
address of `inet_interfaces` (per `inet_protocols`) when the name is a bare
port.  unix services listen on run_directory/private/NAME (0600, mail_owner)
or run_directory/public/NAME (0666) by the private column.
"""

import os
import socket

from pymta.core import log


class ListenError(Exception):
    """A listening socket could not be made; the text names the address."""


def inet_addresses(entry, cfg):
    """The (family, address) pairs an inet service listens on."""
    if entry.host:
        host = entry.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return [(family, host)]
    protocols = {p.lower() for p in cfg.inet_protocols}
    want4 = bool(protocols & {"all", "ipv4"})
    want6 = bool(protocols & {"all", "ipv6"}) and socket.has_ipv6
    result = []
    for iface in cfg.inet_interfaces:
        iface = iface.strip("[]")
        if iface == "all":
            result += ([(socket.AF_INET, "0.0.0.0")] if want4 else []) + ([(socket.AF_INET6, "::")] if want6 else [])
        elif iface in ("loopback-only", "localhost"):
            result += ([(socket.AF_INET, "127.0.0.1")] if want4 else []) + ([(socket.AF_INET6, "::1")] if want6 else [])
        else:
            result.append((socket.AF_INET6 if ":" in iface else socket.AF_INET, iface))
    return result


def unix_path(entry, cfg):
    sub = "private" if entry.private else "public"
    return os.path.join(cfg.run_directory, sub, entry.name)


def describe(entry, cfg):
    """Where a service listens, to compare across reloads."""
    if entry.type == "inet":
        return tuple((f, a, entry.port) for f, a in inet_addresses(entry, cfg))
    return (unix_path(entry, cfg),)


def open_listeners(entry, cfg, owner=None):
    """Create, bind and listen every socket of a service; ListenError on failure."""
    backlog = cfg.listen_backlog
    socks = []
    try:
        if entry.type == "inet":
            for family, addr in inet_addresses(entry, cfg):
                s = socket.socket(family, socket.SOCK_STREAM)
                socks.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    s.bind((addr, entry.port))
                except OSError as e:
                    raise ListenError(f"bind {addr} port {entry.port}: {e.strerror}") from None
                s.listen(backlog)
                s.setblocking(False)
        else:
            path = unix_path(entry, cfg)
            if len(path.encode()) > 107:
                raise ListenError(f"unix socket path too long: {path}")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            socks.append(s)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            old = os.umask(0o077)
            try:
                s.bind(path)
            except OSError as e:
                raise ListenError(f"bind {path}: {e.strerror}") from None
            finally:
                os.umask(old)
            if entry.private:
                if owner is not None:
                    os.chown(path, owner[0], owner[1])
                os.chmod(path, 0o600)
            else:
                os.chmod(path, 0o666)
            s.listen(backlog)
            s.setblocking(False)
    except BaseException:
        for s in socks:
            s.close()
        raise
    log.verbose(f"listening for {entry.name}/{entry.type} on {describe(entry, cfg)}")
    return socks


def close_listeners(entry, cfg, socks):
    for s in socks:
        s.close()
    if entry.type == "unix":
        try:
            os.unlink(unix_path(entry, cfg))
        except FileNotFoundError:
            pass
