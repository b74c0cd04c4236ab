"""TLS building blocks: server and client SSL contexts, reload, log text, certificates.

Servers (smtpd, submission, pop3d, imapd) build one ``ReloadableServerContext``
from ``smtpd_tls_cert_file`` / ``smtpd_tls_key_file`` / ``smtpd_tls_protocols``
and use its ``context`` both for STARTTLS (``loop.start_tls``) and for
implicit-TLS listeners (``ssl=``); ``reload()`` on SIGHUP makes new
handshakes use the files as they are now, old connections keep theirs.

The outbound smtp client asks ``client_policy(smtp_tls_security_level)``
whether to use TLS, whether it is mandatory and whether to verify, and
``client_context`` for the context.

``tls_info(ssl_object)`` gives ``TlsInfo`` whose ``str()`` is what Postfix
logs and puts in Received:, e.g. ``TLSv1.3 with cipher
TLS_AES_256_GCM_SHA384 (256/256 bits)``.

``make_self_signed`` writes the certificate ``pymta init`` starts with.

pymta never offers or accepts less than TLS 1.2, and never compression or
renegotiation.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import ssl
import threading
from typing import NamedTuple

from pymta.core import safeio
from pymta.core.errors import ConfigError

__all__ = [
    "TlsConfigError", "SERVER_CIPHERS", "SECURITY_LEVELS", "parse_protocols",
    "server_context", "ReloadableServerContext", "ClientPolicy", "client_policy",
    "client_context", "TlsInfo", "tls_info", "established_message", "make_self_signed",
]

# TLS 1.2 suites, server preference order: forward secrecy and AEAD first,
# then ECDHE with AES-CBC-SHA2 for older TLS 1.2 peers. TLS 1.3 suites are
# OpenSSL's (all AEAD). No DHE: the stdlib sets no DH parameters.
SERVER_CIPHERS = ("ECDHE+AESGCM:ECDHE+CHACHA20:ECDHE+AES"
                  ":!aNULL:!eNULL:!MD5:!DSS:!RC4:!3DES:!SHA1:!AESCCM8")

_VERSIONS = {
    "SSLV2": None, "SSLV3": None, "TLSV1": None, "TLSV1.1": None,
    "TLSV1.2": ssl.TLSVersion.TLSv1_2, "TLSV1.3": ssl.TLSVersion.TLSv1_3,
}
_ORDER = ["SSLV2", "SSLV3", "TLSV1", "TLSV1.1", "TLSV1.2", "TLSV1.3"]
_FLOOR = ssl.TLSVersion.TLSv1_2


class TlsConfigError(ConfigError):
    """A certificate, key or TLS setting that cannot be used."""


def parse_protocols(spec: str | None) -> tuple[ssl.TLSVersion, ssl.TLSVersion | None]:
    """Postfix ``*_tls_protocols`` syntax -> (minimum, maximum or None).

    Accepts ``>=TLSv1.2``, ``<=TLSv1.3``, a single version (taken as the
    minimum, so ``TLSv1.2`` also allows TLSv1.3, unlike Postfix's reading),
    a list of versions to allow (``TLSv1.2, TLSv1.3``) or to exclude
    (``!SSLv2, !SSLv3, !TLSv1, !TLSv1.1``), separated by commas, blanks or
    colons. Anything below TLS 1.2 is never enabled, so old Postfix settings
    such as ``!SSLv2, !SSLv3`` still work and mean ">= TLSv1.2".
    """
    items = [i for i in re.split(r"[\s,:]+", spec or "") if i]
    if not items:
        return _FLOOR, None
    if len(items) == 1 and items[0][:1].isalpha():
        items = [">=" + items[0]]
    low, high = 0, len(_ORDER) - 1
    allowed, excluded = set(), set()
    for item in items:
        op = ""
        for prefix in (">=", "<=", "!"):
            if item.startswith(prefix):
                op, item = prefix, item[len(prefix):]
                break
        name = item.upper()
        if name not in _VERSIONS:
            raise TlsConfigError(None, None, f"unknown TLS protocol {item!r} in {spec!r}")
        index = _ORDER.index(name)
        if op == ">=":
            low = max(low, index)
        elif op == "<=":
            high = min(high, index)
        elif op == "!":
            excluded.add(index)
        else:
            allowed.add(index)
    enabled = [i for i in range(len(_ORDER))
               if low <= i <= high and i not in excluded and (not allowed or i in allowed)
               and _VERSIONS[_ORDER[i]] is not None]
    if not enabled:
        raise TlsConfigError(None, None, f"TLS protocols {spec!r} leave nothing at TLSv1.2 or newer")
    if enabled != list(range(enabled[0], enabled[-1] + 1)):
        raise TlsConfigError(None, None, f"TLS protocols {spec!r} leave a gap between versions")
    maximum = _VERSIONS[_ORDER[enabled[-1]]]
    return _VERSIONS[_ORDER[enabled[0]]], (None if maximum is ssl.TLSVersion.TLSv1_3 else maximum)


def _harden(ctx: ssl.SSLContext, protocols: str | None) -> None:
    minimum, maximum = parse_protocols(protocols)
    ctx.minimum_version = minimum
    if maximum is not None:
        ctx.maximum_version = maximum
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION


def server_context(cert_file: str, key_file: str, min_version: str = "TLSv1.2", *,
                   ciphers: str = SERVER_CIPHERS) -> ssl.SSLContext:
    """A server SSLContext for ``cert_file`` (PEM, leaf first, then the
    chain) and ``key_file``. ``min_version`` takes the ``smtpd_tls_protocols``
    syntax (``>=TLSv1.2``, ``TLSv1.3``, ...). Raises TlsConfigError naming the
    file and the reason."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx, min_version)
    ctx.options |= (ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_SINGLE_ECDH_USE
                    | ssl.OP_SINGLE_DH_USE)
    try:
        ctx.set_ciphers(ciphers)
    except ssl.SSLError as exc:
        raise TlsConfigError(None, None, f"bad cipher list {ciphers!r}") from exc
    for path in (cert_file, key_file):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise TlsConfigError(path, None, exc.strerror or str(exc)) from exc
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if reason.upper() in ("KEY_VALUES_MISMATCH", "NO_CERTIFICATE_ASSIGNED"):
            reason = f"private key {key_file} does not match the certificate"
        raise TlsConfigError(cert_file, None, f"cannot load certificate and key: {reason}") from exc
    except OSError as exc:
        raise TlsConfigError(cert_file, None, f"cannot load certificate and key: {exc}") from exc
    return ctx


class ReloadableServerContext:
    """A server context whose certificate and key can be replaced at run time.

    ``context`` never changes, so it can be given to ``asyncio.start_server(
    ssl=...)`` once; during each handshake its server-name callback (OpenSSL
    runs it with or without SNI) switches the connection to the context
    loaded last. ``reload()`` re-reads the files if they changed; when they
    are broken it raises TlsConfigError and keeps serving the previous ones.
    """

    def __init__(self, cert_file: str, key_file: str, min_version: str = "TLSv1.2", *,
                 ciphers: str = SERVER_CIPHERS):
        self.cert_file = cert_file
        self.key_file = key_file
        self.min_version = min_version
        self.ciphers = ciphers
        self._lock = threading.Lock()
        self._stamp = self._files_stamp()
        self._front = self._build()
        self._current = self._front
        self._front.sni_callback = self._select
        self.generation = 1

    def _build(self) -> ssl.SSLContext:
        return server_context(self.cert_file, self.key_file, self.min_version, ciphers=self.ciphers)

    def _files_stamp(self) -> tuple:
        stamp = []
        for path in (self.cert_file, self.key_file):
            try:
                st = os.stat(path)
            except OSError as exc:
                raise TlsConfigError(path, None, exc.strerror or str(exc)) from exc
            stamp.append((st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev))
        return tuple(stamp)

    def _select(self, ssl_object, server_name, front) -> None:
        current = self._current
        if current is not front:
            ssl_object.context = current

    @property
    def context(self) -> ssl.SSLContext:
        """The context to hand to listeners and ``start_tls``."""
        return self._front

    @property
    def current(self) -> ssl.SSLContext:
        """The context holding the most recently loaded certificate."""
        return self._current

    def reload(self, force: bool = False) -> bool:
        """Re-read certificate and key if they changed (or ``force``).
        Returns True when a new certificate is now served."""
        with self._lock:
            stamp = self._files_stamp()
            if stamp == self._stamp and not force:
                return False
            new = self._build()
            self._current = new
            self._stamp = stamp
            self.generation += 1
            return True


class ClientPolicy(NamedTuple):
    """What an ``smtp_tls_security_level`` asks of the smtp client."""

    use_tls: bool       # try STARTTLS when the server offers it
    mandatory: bool     # defer the delivery rather than send in clear text
    verify: bool        # check the certificate chain and the host name


SECURITY_LEVELS = {
    "none": ClientPolicy(False, False, False),
    "may": ClientPolicy(True, False, False),
    "encrypt": ClientPolicy(True, True, False),
    "verify": ClientPolicy(True, True, True),
    "secure": ClientPolicy(True, True, True),
}


def client_policy(level: str) -> ClientPolicy:
    """The policy of a Postfix security level; TlsConfigError if unknown or
    unsupported (dane, dane-only, fingerprint)."""
    key = (level or "").strip().lower()
    if key in SECURITY_LEVELS:
        return SECURITY_LEVELS[key]
    if key in ("dane", "dane-only", "fingerprint"):
        raise TlsConfigError(None, None, f"TLS security level {level!r} is not supported by pymta "
                                         "(use none, may, encrypt, verify or secure)")
    raise TlsConfigError(None, None, f"unknown TLS security level {level!r} "
                                     "(use none, may, encrypt, verify or secure)")


def client_context(level: str, ca_file: str | None = None, *,
                   min_version: str = "TLSv1.2") -> ssl.SSLContext | None:
    """The client SSLContext for ``smtp_tls_security_level`` = ``level``.

    ``none``: None (no TLS). ``may``, ``encrypt``: encryption without
    certificate checks (Postfix does the same: opportunistic TLS cannot
    verify). ``verify``, ``secure``: chain checked against ``ca_file``
    (``smtp_tls_CAfile``) or the system CAs, and the host name given as
    ``server_hostname`` must match (pass the MX name for verify, the
    next-hop domain for secure).
    """
    policy = client_policy(level)
    if not policy.use_tls:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx, min_version)
    if policy.verify:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = True
        try:
            if ca_file:
                ctx.load_verify_locations(cafile=ca_file)
            else:
                ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        except (OSError, ssl.SSLError) as exc:
            raise TlsConfigError(ca_file, None, f"cannot load CA certificates: {exc}") from exc
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class TlsInfo(NamedTuple):
    """Protocol, cipher and secret bits of a TLS connection."""

    version: str
    cipher: str
    bits: int

    def __str__(self) -> str:
        return f"{self.version} with cipher {self.cipher} ({self.bits}/{self.bits} bits)"


def tls_info(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> TlsInfo | None:
    """``TlsInfo`` of an established connection (asyncio:
    ``transport.get_extra_info("ssl_object")``), None before the handshake."""
    cipher = ssl_object.cipher()
    if cipher is None:
        return None
    name, protocol, bits = cipher
    return TlsInfo(ssl_object.version() or protocol, name, int(bits or 0))


def established_message(info: TlsInfo, peer: str, *, inbound: bool = True,
                        trust: str | None = None) -> str:
    """The Postfix log text for a new TLS session, e.g.
    ``Anonymous TLS connection established from host[192.0.2.1]: TLSv1.3 with
    cipher ...`` (smtpd) or ``Untrusted TLS connection established to
    mx.example[192.0.2.1]:25: ...`` (smtp, ``trust`` Untrusted, Trusted or
    Verified)."""
    trust = trust or ("Anonymous" if inbound else "Untrusted")
    direction = "from" if inbound else "to"
    return f"{trust} TLS connection established {direction} {peer}: {info}"


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _san_entries(hostname: str):
    from cryptography import x509

    names = []
    for name in (hostname, "localhost", "127.0.0.1", "::1"):
        try:
            entry = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            entry = x509.DNSName(name)
        if entry not in names:
            names.append(entry)
    return names


def _check_hostname(hostname: str) -> str:
    try:
        ipaddress.ip_address(hostname)
        return hostname
    except ValueError:
        pass
    try:
        ascii_name = hostname.rstrip(".").encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise ValueError(f"bad host name {hostname!r}") from exc
    labels = ascii_name.split(".")
    if not ascii_name or len(ascii_name) > 253 or not all(_HOST_LABEL.fullmatch(x) for x in labels):
        raise ValueError(f"bad host name {hostname!r}")
    return ascii_name.lower()


def make_self_signed(hostname: str, cert_path: str, key_path: str, days: int = 3650, *,
                     key_type: str = "rsa", overwrite: bool = False) -> None:
    """Write a self-signed server certificate for ``hostname`` (also valid
    for localhost, 127.0.0.1 and ::1) and its key.

    ``key_type`` "rsa" (2048 bits, what every client accepts) or "ec"
    (P-256). The key is written first, mode 0600, the certificate mode 0644,
    each atomically (temporary file, fsync, rename, directory fsync).
    Existing files are replaced only if ``overwrite``.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    name = _check_hostname(hostname)
    if days < 1:
        raise ValueError("days must be at least 1")
    if not overwrite:
        for path in (cert_path, key_path):
            if os.path.lexists(path):
                raise FileExistsError(f"{path} exists; not overwriting it")
    if key_type == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif key_type == "ec":
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        raise ValueError(f"key_type must be 'rsa' or 'ec', not {key_type!r}")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)] if len(name) <= 64
                        else [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pymta")])
    now = datetime.datetime.now(datetime.timezone.utc)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_san_entries(name)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_encipherment=(key_type == "rsa"), content_commitment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    safeio.atomic_write(key_path, key_pem, 0o600)
    safeio.atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
