"""Tests for pymta.core.sasl: PLAIN and LOGIN exchanges, sans-IO."""

import base64
import smtplib

import pytest
from hypothesis import given, settings, strategies as st

from pymta.core import sasl

USERNAME_B64 = b"VXNlcm5hbWU6"      # "Username:", what Postfix/Cyrus send
PASSWORD_B64 = b"UGFzc3dvcmQ6"      # "Password:"


def b64(data: bytes | str) -> bytes:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return base64.b64encode(data)


# ---------------------------------------------------------------- PLAIN

def test_plain_with_initial_response():
    exchange = sasl.new_exchange("PLAIN")
    result = exchange.start(b64("\0alice@example.org\0s3cret"))
    assert result == sasl.Result("PLAIN", "alice@example.org", b"s3cret", "")
    assert exchange.done


def test_plain_without_initial_response_gets_empty_challenge():
    exchange = sasl.new_exchange(b"plain")
    challenge = exchange.start(None)
    assert challenge == sasl.Challenge(b"") and challenge.encoded() == b""
    assert not exchange.done
    result = exchange.step(b64("\0alice@example.org\0s3cret") + b"\r\n")
    assert (result.username, result.password) == ("alice@example.org", b"s3cret")


def test_plain_utf8_and_colon_in_password():
    result = sasl.new_exchange("PLAIN").start(b64("\0jörg@example.org\0pä:ss wörd"))
    assert result.username == "jörg@example.org"
    assert result.password == "pä:ss wörd".encode()


@pytest.mark.parametrize("authzid", ["alice@example.org", "ALICE@Example.org"])
def test_plain_authzid_equal_to_authcid_is_accepted(authzid):
    result = sasl.new_exchange("PLAIN").start(b64(f"{authzid}\0alice@example.org\0pw"))
    assert result.authzid == authzid and result.username == "alice@example.org"


def test_plain_proxy_authorization_is_refused():
    exchange = sasl.new_exchange("PLAIN")
    with pytest.raises(sasl.SaslAuthzidError, match="differs"):
        exchange.start(b64("root@example.org\0alice@example.org\0pw"))
    assert exchange.done


@pytest.mark.parametrize("message,reason", [
    (b"alice@example.org pw", "authzid NUL authcid NUL password"),
    (b"\0alice@example.org", "authzid NUL authcid NUL password"),
    (b"\0alice\0pw\0extra", "authzid NUL authcid NUL password"),
    (b"\0\0pw", "empty username"),
    (b"\0alice@example.org\0", "empty password"),
    (b"\0al\xffice\0pw", "not UTF-8"),
    (b"\xff\0alice\0pw", "not UTF-8"),
    (b"\0alice\r\nX-Injected: yes\0pw", "control characters"),
    (b"\0alice\x1b[31m\0pw", "control characters"),
    ("\0\u05cf\0pw".encode(), "unprintable"),           # unassigned code point
    ("\0ali\u200bce\0pw".encode(), "unprintable"),       # zero-width space
    (b"\0" + b"a" * 1025 + b"\0pw", "longer than 1024"),
    (b"\0alice\0" + b"p" * 1025, "longer than 1024"),
    (b"", "authzid NUL authcid NUL password"),
])
def test_plain_malformed(message, reason):
    with pytest.raises(sasl.SaslMalformed, match=reason):
        sasl.new_exchange("PLAIN").start(b64(message))


def test_plain_equals_initial_response_is_empty_message():
    with pytest.raises(sasl.SaslMalformed):
        sasl.new_exchange("PLAIN").start(b"=")


# ---------------------------------------------------------------- LOGIN

def test_login_transcript():
    exchange = sasl.new_exchange("LOGIN")
    first = exchange.start()
    assert first.encoded() == USERNAME_B64
    second = exchange.step(b64("alice@example.org"))
    assert second.encoded() == PASSWORD_B64
    result = exchange.step(b64("s3cret"))
    assert result == sasl.Result("LOGIN", "alice@example.org", b"s3cret")


def test_login_initial_response_is_the_username():
    exchange = sasl.new_exchange("login")
    assert exchange.start(b64("alice@example.org")).encoded() == PASSWORD_B64
    assert exchange.step(b64("pw")).username == "alice@example.org"


@pytest.mark.parametrize("steps,error", [
    ([b"="], sasl.SaslMalformed),                      # empty initial response
    ([None, b""], sasl.SaslMalformed),                 # empty username
    ([None, b64("alice"), b""], sasl.SaslMalformed),   # empty password
    ([None, b64("al\nice")], sasl.SaslMalformed),
    ([None, b"*"], sasl.SaslCancelled),
    ([None, b64("alice"), b"*"], sasl.SaslCancelled),
    ([None, b"not base64!"], sasl.SaslDecodeError),
])
def test_login_errors(steps, error):
    exchange = sasl.new_exchange("LOGIN")
    with pytest.raises(error):
        exchange.start(steps[0])
        for line in steps[1:]:
            exchange.step(line)
    assert exchange.done


# ---------------------------------------------------------------- decoding

@pytest.mark.parametrize("line,decoded", [
    (b"YWJj", b"abc"),
    (b"  YWJj \r\n", b"abc"),
    ("YWJj", b"abc"),
    (b"YWI=", b"ab"),
    (b"YWI", b"ab"),                  # missing padding is tolerated
    (b"YQ", b"a"),
    (b"", b""),
])
def test_decode_response(line, decoded):
    assert sasl.decode_response(line) == decoded


@pytest.mark.parametrize("line", [
    b"YWJj!", b"YW Jj", b"Y", b"YWJjZ", b"=", b"Y===", b"YW=j", "YWJjé", b"YWJj\x00",
    b"A" * (sasl.MAX_RESPONSE_LENGTH + 4),
])
def test_decode_response_rejects(line):
    with pytest.raises(sasl.SaslDecodeError):
        sasl.decode_response(line)


def test_equals_is_only_special_as_initial_response():
    assert sasl.decode_response(b"=", initial=True) == b""
    with pytest.raises(sasl.SaslCancelled):
        sasl.decode_response(b" *\r\n")


def test_bad_base64_initial_response():
    exchange = sasl.new_exchange("PLAIN")
    with pytest.raises(sasl.SaslDecodeError, match="not base64"):
        exchange.start(b"%%%")
    assert exchange.done


# ---------------------------------------------------------------- lifecycle

def test_state_errors_are_programming_errors():
    exchange = sasl.new_exchange("PLAIN")
    with pytest.raises(RuntimeError):
        exchange.step(b64("\0a\0b"))
    exchange.start(b64("\0a\0b"))
    with pytest.raises(RuntimeError):
        exchange.step(b64("\0a\0b"))
    with pytest.raises(RuntimeError):
        exchange.start(None)


def test_mechanism_registry():
    assert sasl.mechanism_names() == ["PLAIN", "LOGIN"]
    assert isinstance(sasl.new_exchange("Plain"), sasl.Plain)
    assert isinstance(sasl.new_exchange(b"LOGIN"), sasl.Login)
    with pytest.raises(sasl.UnknownMechanism, match="CRAM-MD5"):
        sasl.new_exchange("CRAM-MD5")
    with pytest.raises(sasl.UnknownMechanism):
        sasl.new_exchange("LOGIN", allowed=["PLAIN"])
    with pytest.raises(sasl.UnknownMechanism) as info:
        sasl.new_exchange(b"X\x1b[2J\r\n")
    assert "\x1b" not in info.value.reason and "\r" not in info.value.reason
    assert isinstance(sasl.new_exchange("login", allowed=("plain", "login")), sasl.Login)


def test_secrets_stay_out_of_reprs_and_errors():
    result = sasl.new_exchange("PLAIN").start(b64("\0alice\0hunter2"))
    assert "hunter2" not in repr(result)
    with pytest.raises(sasl.SaslAuthzidError) as info:
        sasl.new_exchange("PLAIN").start(b64("bob\0alice\0hunter2"))
    assert "hunter2" not in str(info.value)


# ---------------------------------------------------------------- real clients

def test_smtplib_client_encodings():
    """What Python's smtplib sends for AUTH PLAIN and AUTH LOGIN."""
    client = smtplib.SMTP()
    client.user, client.password = "alice@example.org", "pä ss"
    plain = base64.b64encode(client.auth_plain().encode("utf-8"))
    result = sasl.new_exchange("PLAIN").start(plain)
    assert (result.username, result.password) == ("alice@example.org", "pä ss".encode())

    client._auth_challenge_count = 1
    login = sasl.new_exchange("LOGIN")
    challenge = login.start(base64.b64encode(client.auth_login().encode()))
    client._auth_challenge_count = 2
    result = login.step(base64.b64encode(client.auth_login(challenge.data.decode()).encode()))
    assert (result.username, result.password) == ("alice@example.org", "pä ss".encode())
    client.close()


# ---------------------------------------------------------------- hostile input

@settings(max_examples=300, deadline=None)
@given(mechanism=st.sampled_from(["PLAIN", "LOGIN"]),
       lines=st.lists(st.one_of(st.binary(max_size=64), st.binary(max_size=48).map(base64.b64encode)),
                      min_size=1, max_size=4),
       initial=st.booleans())
def test_random_input_only_raises_sasl_errors(mechanism, lines, initial):
    exchange = sasl.new_exchange(mechanism)
    try:
        out = exchange.start(lines[0] if initial else None)
        for line in lines[int(initial):]:
            if exchange.done:
                break
            out = exchange.step(line)
    except sasl.SaslError as exc:
        assert exchange.done and exc.reason
        return
    assert isinstance(out, (sasl.Challenge, sasl.Result))
    if isinstance(out, sasl.Result):
        assert out.username and out.password and out.username.isprintable()
