"""Tests for pymta.core.tls: real loopback handshakes between our contexts."""

import asyncio
import ipaddress
import os
import re
import ssl
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pymta.core import tls

POSTFIX_TLS_RE = re.compile(r"TLSv1\.[23] with cipher [A-Z0-9_-]+ \((\d+)/\1 bits\)")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A self-signed certificate for mail.example.org and its key."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = str(d / "cert.pem"), str(d / "key.pem")
    tls.make_self_signed("mail.example.org", cert, key)
    return cert, key


@pytest.fixture(scope="module")
def other_rsa_key(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls-rsa")
    tls.make_self_signed("x.example", str(d / "c.pem"), str(d / "k.pem"))
    return str(d / "k.pem")


@pytest.fixture(scope="module")
def other_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls-other")
    cert, key = str(d / "cert.pem"), str(d / "key.pem")
    tls.make_self_signed("mail.example.org", cert, key, key_type="ec")
    return cert, key


def der(cert_file):
    with open(cert_file, "rb") as f:
        return x509.load_pem_x509_certificate(f.read()).public_bytes(serialization.Encoding.DER)


async def _exchange(server_ctx, client_ctx, server_hostname, errors):
    seen = {}

    async def handle(reader, writer):
        seen["server"] = tls.tls_info(writer.get_extra_info("ssl_object"))
        writer.write(b"220 hello\r\n")
        await writer.drain()
        writer.close()

    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: errors.append(context.get("exception")))
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname=server_hostname), 10)
        ssl_object = writer.get_extra_info("ssl_object")
        seen["client"] = tls.tls_info(ssl_object)
        seen["peer"] = ssl_object.getpeercert(binary_form=True)
        seen["compression"] = ssl_object.compression()
        seen["data"] = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()
    return seen


def handshake(server_ctx, client_ctx, server_hostname="localhost"):
    """Serve one implicit-TLS connection on loopback and connect to it."""
    errors = []
    return asyncio.run(_exchange(server_ctx, client_ctx, server_hostname, errors))


# ---------------------------------------------------------------- certificates

def test_self_signed_files_and_modes(pair):
    cert, key = pair
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(cert).st_mode) == 0o644
    assert sorted(os.listdir(os.path.dirname(cert))) == ["cert.pem", "key.pem"]
    with open(key, "rb") as f:
        private = serialization.load_pem_private_key(f.read(), password=None)
    assert isinstance(private, rsa.RSAPrivateKey) and private.key_size == 2048


def test_self_signed_names_and_extensions(pair):
    with open(pair[0], "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "mail.example.org"
    assert cert.issuer == cert.subject
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mail.example.org", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"),
                                                        ipaddress.ip_address("::1")]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert 3650 <= days <= 3651


def test_self_signed_ec_and_ip_hostname(tmp_path):
    cert, key = str(tmp_path / "c.pem"), str(tmp_path / "k.pem")
    tls.make_self_signed("192.0.2.7", cert, key, days=2, key_type="ec")
    with open(key, "rb") as f:
        private = serialization.load_pem_private_key(f.read(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp256r1"
    with open(cert, "rb") as f:
        san = x509.load_pem_x509_certificate(f.read()).extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("192.0.2.7") in san.get_values_for_type(x509.IPAddress)


def test_self_signed_idn_hostname(tmp_path):
    cert, key = str(tmp_path / "c.pem"), str(tmp_path / "k.pem")
    tls.make_self_signed("mail.bücher.example", cert, key)
    with open(cert, "rb") as f:
        san = x509.load_pem_x509_certificate(f.read()).extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
    assert "mail.xn--bcher-kva.example" in san.get_values_for_type(x509.DNSName)


def test_self_signed_refuses_to_overwrite(tmp_path):
    cert, key = str(tmp_path / "c.pem"), str(tmp_path / "k.pem")
    tls.make_self_signed("a.example", cert, key)
    before = open(key, "rb").read()
    with pytest.raises(FileExistsError):
        tls.make_self_signed("a.example", cert, key)
    assert open(key, "rb").read() == before
    tls.make_self_signed("a.example", cert, key, overwrite=True)
    assert open(key, "rb").read() != before


@pytest.mark.parametrize("kwargs", [
    {"hostname": "bad_host.example"}, {"hostname": "-x.example"}, {"hostname": ""},
    {"hostname": "a.example", "key_type": "dsa"}, {"hostname": "a.example", "days": 0},
])
def test_self_signed_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        tls.make_self_signed(cert_path=str(tmp_path / "c"), key_path=str(tmp_path / "k"), **kwargs)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- handshakes

def test_loopback_handshake_tls13(pair):
    seen = handshake(tls.server_context(*pair), tls.client_context("may"))
    assert seen["data"] == b"220 hello\r\n"
    assert seen["client"] == seen["server"]
    assert seen["client"].version == "TLSv1.3"
    assert str(seen["client"]) == f"TLSv1.3 with cipher {seen['client'].cipher} ({seen['client'].bits}/{seen['client'].bits} bits)"
    assert POSTFIX_TLS_RE.fullmatch(str(seen["server"]))
    assert seen["compression"] is None
    assert seen["peer"] == der(pair[0])


def test_tls12_client_gets_forward_secret_aead(pair):
    client = tls.client_context("encrypt", min_version="<=TLSv1.2")
    seen = handshake(tls.server_context(*pair), client)
    version, cipher, bits = seen["server"]
    assert version == "TLSv1.2" and cipher.startswith("ECDHE-RSA-") and bits >= 128
    assert str(seen["server"]) == f"TLSv1.2 with cipher {cipher} ({bits}/{bits} bits)"
    assert "GCM" in cipher or "CHACHA20" in cipher


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_server_refuses_tls11_clients(pair):
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    client.minimum_version = ssl.TLSVersion.TLSv1
    client.maximum_version = ssl.TLSVersion.TLSv1_1
    client.set_ciphers("DEFAULT:@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        handshake(tls.server_context(*pair), client)


def test_tls13_only_server(pair):
    client = tls.client_context("may", min_version="<=TLSv1.2")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        handshake(tls.server_context(*pair, min_version=">=TLSv1.3"), client)


@pytest.mark.parametrize("host", ["localhost", "mail.example.org", "127.0.0.1"])
def test_verify_accepts_with_the_cert_as_ca(pair, host):
    for level in ("verify", "secure"):
        client = tls.client_context(level, ca_file=pair[0])
        assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname
        seen = handshake(tls.server_context(*pair), client, server_hostname=host)
        assert seen["data"] == b"220 hello\r\n"


def test_verify_accepts_under_x509_strict(pair):
    client = tls.client_context("verify", ca_file=pair[0])
    client.verify_flags |= ssl.VERIFY_X509_STRICT      # Python 3.13's default
    assert handshake(tls.server_context(*pair), client)["data"] == b"220 hello\r\n"


def test_verify_rejects_unknown_ca(pair):
    with pytest.raises(ssl.SSLCertVerificationError, match="self.signed|unable to get"):
        handshake(tls.server_context(*pair), tls.client_context("verify"))


def test_verify_rejects_other_ca(pair, other_pair):
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(tls.server_context(*pair), tls.client_context("secure", ca_file=other_pair[0]))


def test_verify_rejects_wrong_hostname(pair):
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        handshake(tls.server_context(*pair), tls.client_context("verify", ca_file=pair[0]),
                  server_hostname="mx.other.example")


def test_opportunistic_levels_do_not_verify(pair):
    for level in ("may", "encrypt"):
        client = tls.client_context(level)
        assert client.verify_mode == ssl.CERT_NONE and not client.check_hostname
        assert handshake(tls.server_context(*pair), client, "wrong.example")["data"] == b"220 hello\r\n"


# ---------------------------------------------------------------- reload

def test_reload_serves_new_certificate_to_new_connections(tmp_path, pair, other_pair):
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    for src, dst in zip(pair, (cert, key)):
        with open(src, "rb") as f:
            data = f.read()
        with open(dst, "wb") as f:
            f.write(data)
    reloadable = tls.ReloadableServerContext(cert, key)
    listener_ctx = reloadable.context
    assert handshake(listener_ctx, tls.client_context("may"))["peer"] == der(pair[0])
    assert reloadable.reload() is False

    for src, dst in zip(other_pair, (cert, key)):
        with open(src, "rb") as f:
            data = f.read()
        tmp = dst + ".new"
        with open(tmp, "wb") as f:
            f.write(data)
        os.rename(tmp, dst)
    assert reloadable.reload() is True and reloadable.generation == 2
    assert reloadable.context is listener_ctx
    seen = handshake(listener_ctx, tls.client_context("may"))
    assert seen["peer"] == der(other_pair[0])
    assert "ECDSA" in seen["client"].cipher or seen["client"].version == "TLSv1.3"
    # with SNI too
    assert handshake(listener_ctx, tls.client_context("may"), "mail.example.org")["peer"] == der(other_pair[0])


def test_reload_keeps_serving_when_new_files_are_broken(tmp_path, pair):
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    tls.make_self_signed("a.example", cert, key)
    reloadable = tls.ReloadableServerContext(cert, key)
    good = der(cert)
    with open(key, "w") as f:
        f.write("-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    with pytest.raises(tls.TlsConfigError, match=re.escape(cert)):
        reloadable.reload()
    assert handshake(reloadable.context, tls.client_context("may"))["peer"] == good


def test_starttls_with_reloadable_context(pair):
    """The STARTTLS path: plain text first, then asyncio's start_tls."""
    reloadable = tls.ReloadableServerContext(*pair)

    async def run():
        done = {}

        async def handle(reader, writer):
            writer.write(b"220 ready\r\n")
            await writer.drain()
            assert await reader.readline() == b"STARTTLS\r\n"
            writer.write(b"220 2.0.0 Ready to start TLS\r\n")
            await writer.drain()
            await writer.start_tls(reloadable.context)
            done["info"] = tls.tls_info(writer.get_extra_info("ssl_object"))
            writer.write(b"250 ok\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await reader.readline() == b"220 ready\r\n"
        writer.write(b"STARTTLS\r\n")
        assert (await reader.readline()).startswith(b"220 2.0.0")
        await writer.start_tls(tls.client_context("verify", ca_file=pair[0]), server_hostname="localhost")
        assert await reader.readline() == b"250 ok\r\n"
        client = tls.tls_info(writer.get_extra_info("ssl_object"))
        writer.close()
        server.close()
        await server.wait_closed()
        return client, done["info"]

    client, server = asyncio.run(run())
    assert client == server and POSTFIX_TLS_RE.fullmatch(str(server))


# ---------------------------------------------------------------- errors and helpers

def test_missing_files_name_the_file(tmp_path, pair):
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(tls.TlsConfigError, match=re.escape(missing) + ".*No such file"):
        tls.server_context(missing, pair[1])
    with pytest.raises(tls.TlsConfigError, match=re.escape(missing)):
        tls.server_context(pair[0], missing)
    with pytest.raises(tls.TlsConfigError):
        tls.ReloadableServerContext(missing, pair[1])


def test_key_mismatch_and_garbage(tmp_path, pair, other_pair, other_rsa_key):
    with pytest.raises(tls.TlsConfigError, match="does not match"):
        tls.server_context(pair[0], other_pair[1])          # RSA cert, EC key
    with pytest.raises(tls.TlsConfigError, match="does not match"):
        tls.server_context(pair[0], other_rsa_key)          # RSA cert, other RSA key
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(tls.TlsConfigError, match="cannot load certificate"):
        tls.server_context(str(junk), pair[1])


def test_error_is_a_config_error(pair):
    from pymta.core.errors import ConfigError
    with pytest.raises(ConfigError):
        tls.server_context(pair[0], pair[1], min_version="SSLv4")


@pytest.mark.parametrize("spec,expected", [
    ("", (ssl.TLSVersion.TLSv1_2, None)),
    ("TLSv1.2", (ssl.TLSVersion.TLSv1_2, None)),
    (">=TLSv1.2", (ssl.TLSVersion.TLSv1_2, None)),
    (">=TLSv1.3", (ssl.TLSVersion.TLSv1_3, None)),
    ("TLSv1.3", (ssl.TLSVersion.TLSv1_3, None)),
    (">=TLSv1", (ssl.TLSVersion.TLSv1_2, None)),
    ("!SSLv2, !SSLv3", (ssl.TLSVersion.TLSv1_2, None)),
    ("!SSLv2:!SSLv3:!TLSv1:!TLSv1.1:!TLSv1.2", (ssl.TLSVersion.TLSv1_3, None)),
    ("TLSv1.2, TLSv1.3", (ssl.TLSVersion.TLSv1_2, None)),
    ("<=TLSv1.2", (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2)),
    (">=tlsv1.2 <=TLSV1.3", (ssl.TLSVersion.TLSv1_2, None)),
])
def test_parse_protocols(spec, expected):
    assert tls.parse_protocols(spec) == expected


@pytest.mark.parametrize("spec,reason", [
    ("TLSv9", "unknown TLS protocol"),
    ("<=TLSv1.1", "nothing at TLSv1.2 or newer"),
    ("!TLSv1.2 !TLSv1.3", "nothing"),
])
def test_parse_protocols_errors(spec, reason):
    with pytest.raises(tls.TlsConfigError, match=reason):
        tls.parse_protocols(spec)


def test_client_policies():
    assert tls.client_context("none") is None
    assert tls.client_policy("none") == (False, False, False)
    assert tls.client_policy("may") == tls.ClientPolicy(use_tls=True, mandatory=False, verify=False)
    assert tls.client_policy("Encrypt") == (True, True, False)
    assert tls.client_policy("verify") == tls.client_policy("secure") == (True, True, True)
    with pytest.raises(tls.TlsConfigError, match="not supported"):
        tls.client_context("dane")
    with pytest.raises(tls.TlsConfigError, match="unknown TLS security level"):
        tls.client_context("paranoid")
    with pytest.raises(tls.TlsConfigError, match="cannot load CA"):
        tls.client_context("verify", ca_file="/nonexistent/ca.pem")


def test_client_context_settings():
    ctx = tls.client_context("may")
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_COMPRESSION and ctx.options & ssl.OP_NO_RENEGOTIATION


def test_tls_info_before_handshake(pair):
    obj = tls.server_context(*pair).wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
    assert tls.tls_info(obj) is None


def test_established_message():
    info = tls.TlsInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", 256)
    assert tls.established_message(info, "client.example[192.0.2.1]") == (
        "Anonymous TLS connection established from client.example[192.0.2.1]: "
        "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)")
    assert tls.established_message(info, "mx.example[192.0.2.2]:25", inbound=False, trust="Verified") == (
        "Verified TLS connection established to mx.example[192.0.2.2]:25: "
        "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)")
    version, cipher, bits = info
    assert (version, cipher, bits) == ("TLSv1.3", "TLS_AES_256_GCM_SHA384", 256)
