"""SMTP AUTH for smtpd: the SASL exchange, password checks and throttling.

The protocol engine parses `AUTH mech [initial]` and the client's base64
lines; this module runs the mechanism (pymta.core.sasl), checks the
credentials against etc/users (pymta.core.users, in a small thread pool:
an argon2 check costs ~0.1 s and 64 MiB) and applies the per-client
failure delay and refusal of pymta.core.authlimit.

A failed login is logged the way Postfix logs it with Dovecot SASL, which
fail2ban's stock postfix filter (mode auth) matches:

    warning: host[192.0.2.1]: SASL LOGIN authentication failed: UGFzc3dvcmQ6
    warning: host[192.0.2.1]: SASL PLAIN authentication failed: authentication failure

(the text after the colon is the last challenge, base64, or "authentication
failure" when there was none).  Neither the username nor the password is
ever logged.
"""

import base64
import concurrent.futures
import os

from pymta.core import log, sasl
from pymta.core.authlimit import AuthThrottle
from pymta.core.tables import split_spec, split_table_list
from pymta.core.users import UsersDB, UsersFileError

AUTH_THREADS = 2        # parallel password checks per process (memory-hard hashes)

S530_TLS_FIRST = (530, "5.7.0", "Must issue a STARTTLS command first")
S454_REFUSED = (454, "4.7.0", "Too many failed authentications, try again later")
S454_TEMP = (454, "4.7.0", "Temporary authentication failure")
S504_MECH = (504, "5.5.4", "Unrecognized authentication type")
S501_DECODE = (501, "5.5.2", "Cannot decode response")
S501_ABORT = (501, "5.7.0", "Authentication aborted")


def users_file(cfg):
    """The passwd-file that holds the users: the passwd-file: table of
    virtual_mailbox_maps, else $config_directory/users."""
    for spec in split_table_list(cfg.get_str("virtual_mailbox_maps")):
        kind, name = split_spec(cfg.expand(spec))
        if kind == "passwd-file":
            return name if os.path.isabs(name) else os.path.join(cfg.config_dir, name)
    return os.path.join(cfg.config_dir, "users")


class SaslServer:
    """Per process: mechanisms offered, the users file, the throttle."""

    def __init__(self, cfg):
        self.mechanisms = tuple(sasl.mechanism_names())
        self.db = UsersDB(users_file(cfg), on_load=self._loaded)
        self.throttle = AuthThrottle.from_config(cfg)
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=AUTH_THREADS, thread_name_prefix="auth")

    @staticmethod
    def _loaded(users):
        for line, reason in users.problems:
            log.warning(f"{users.path}:{line}: {reason}")


class AuthExchange:
    """One AUTH command in progress."""

    def __init__(self, server, mechanism):
        self.server = server
        self.mechanism = mechanism
        self.exchange = sasl.new_exchange(mechanism, server.mechanisms)
        self.last_challenge = b""

    def start(self, initial):
        """Begin with the engine's decoded initial response (None: none)."""
        if initial is None:
            return self.exchange.start(None)
        return self.exchange.start(base64.b64encode(initial) if initial else b"=")

    def step(self, data):
        return self.exchange.step(base64.b64encode(data))

    def failure_text(self):
        """What Postfix puts after "authentication failed:"."""
        if self.last_challenge:
            return base64.b64encode(self.last_challenge).decode("ascii")
        return "authentication failure"


async def verify(loop, server, result):
    """Check a SASL result's credentials: a users.Verdict.  Raises
    UsersFileError when the users file cannot be read."""
    return await loop.run_in_executor(server.executor, server.db.authenticate,
                                      result.username, result.password)


__all__ = ["SaslServer", "AuthExchange", "verify", "users_file", "UsersFileError",
           "S530_TLS_FIRST", "S454_REFUSED", "S454_TEMP", "S504_MECH", "S501_DECODE",
           "S501_ABORT"]
