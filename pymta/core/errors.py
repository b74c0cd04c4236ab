"""Errors shared by every pymta program, and the sysexits exit codes.

Temporary versus permanent failure is carried by the exception type, never by
a flag a caller can forget: `TempFail` means "try again later" (4.x.x),
`PermFail` means "give up and bounce" (5.x.x).
"""

# sysexits.h, as Postfix's commands use them.
EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_NOUSER = 67
EX_NOHOST = 68
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_OSERR = 71
EX_OSFILE = 72
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_PROTOCOL = 76
EX_NOPERM = 77
EX_CONFIG = 78


class PymtaError(Exception):
    """Base class of pymta's own errors."""


class ConfigError(PymtaError):
    """A configuration mistake, located by file and line when known."""

    def __init__(self, file, line, reason):
        self.file = file
        self.line = line
        self.reason = reason
        super().__init__(str(self))

    def __str__(self):
        if self.file and self.line:
            return f"{self.file}:{self.line}: {self.reason}"
        if self.file:
            return f"{self.file}: {self.reason}"
        return self.reason


class DeliveryError(PymtaError):
    """A delivery failure with an enhanced status code (RFC 3463)."""

    def __init__(self, dsn, text):
        self.dsn = dsn
        self.text = text
        super().__init__(f"{dsn} {text}")


class TempFail(DeliveryError):
    """A temporary failure: the message stays queued and is retried."""


class PermFail(DeliveryError):
    """A permanent failure: the recipient is bounced."""
