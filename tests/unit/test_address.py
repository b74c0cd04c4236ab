"""Tests for pymta.core.address: RFC 5321 paths, mailboxes, ESMTP parameters."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pymta.core.address import (
    AddressError,
    NeedsSMTPUTF8,
    decode_xtext,
    is_xtext,
    parse_domain,
    parse_esmtp_params,
    parse_mailbox,
    parse_path,
    quote_local,
    split_address,
    split_path_and_params,
    unquote_local,
)
from pymta.core.errors import PymtaError


@pytest.mark.parametrize("text, expected", [
    ("<user@example.org>", "user@example.org"),
    ("<User.Name+tag@Example.ORG>", "User.Name+tag@Example.ORG"),
    ("<>", ""),
    ("<postmaster>", "postmaster"),
    ("<\"john doe\"@example.org>", "\"john doe\"@example.org"),
    ("<\"plain\"@example.org>", "plain@example.org"),
    ("<\"a\\\"b\"@example.org>", "\"a\\\"b\"@example.org"),
    ("<\"a@b\"@example.org>", "\"a@b\"@example.org"),
    ("<\"\"@example.org>", "\"\"@example.org"),
    ("<user@[192.0.2.1]>", "user@[192.0.2.1]"),
    ("<user@[IPv6:2001:db8::1]>", "user@[IPv6:2001:db8::1]"),
    ("<@relay.example,@other.example:user@example.org>", "user@example.org"),
    ("<@relay.example:user@example.org>", "user@example.org"),
    ("<!#$%&'*+/=?^_`{|}~-@example.org>", "!#$%&'*+/=?^_`{|}~-@example.org"),
    ("<a@xn--bcher-kva.example>", "a@xn--bcher-kva.example"),
    ("<a@a-b.c-d.example>", "a@a-b.c-d.example"),
], ids=lambda v: repr(v))
def test_parse_path_valid(text, expected):
    assert parse_path(text) == expected


@pytest.mark.parametrize("text, reason", [
    ("user@example.org", "enclosed in <>"),
    ("<user@example.org", "missing '>'"),
    ("<", "missing '>'"),
    ("<@example.org>", "source route without ':'"),
    ("<user@>", "empty domain"),
    ("<user@example..org>", "empty label"),
    ("<user@example.org.>", "ends with a dot"),
    ("<user@-example.org>", "invalid domain label"),
    ("<user@exa_mple.org>", "invalid domain label"),
    ("<user@example-.org>", "invalid domain label"),
    ("<.user@example.org>", "local part"),
    ("<user.@example.org>", "local part"),
    ("<us..er@example.org>", "local part"),
    ("<us er@example.org>", "local part"),
    ("<us(er@example.org>", "local part"),
    ("<\"unterminated@example.org>", "unterminated quoted"),
    ("<\"a\"b@example.org>", "garbage after quoted"),
    ("<\"a\x01\"@example.org>", "control character"),
    ("<\"a\\\x01\"@example.org>", "after backslash"),
    ("<user@[192.0.2.256]>", "invalid IPv4"),
    ("<user@[1.2.3]>", "invalid IPv4"),
    ("<user@[IPv6:zz::1]>", "invalid IPv6"),
    ("<user@[x-tag:abc]>", "unsupported address literal"),
    ("<user@[192.0.2.1>", "closing ']'"),
    ("<relay.example:user@example.org>", "local part"),
    ("<@relay.example,other.example:user@example.org>", "hop without '@'"),
    ("<@bad_hop:user@example.org>", "invalid domain label"),
], ids=lambda v: repr(v))
def test_parse_path_invalid(text, reason):
    with pytest.raises(AddressError) as info:
        parse_path(text)
    assert reason in str(info.value)


def test_address_error_is_pymta_error_and_value_error():
    with pytest.raises(PymtaError):
        parse_path("<a@>")
    with pytest.raises(ValueError):
        parse_path("<a@>")


def test_null_path_can_be_refused():
    with pytest.raises(AddressError, match="null address"):
        parse_path("<>", allow_null=False)


def test_local_only_can_be_refused():
    with pytest.raises(AddressError, match="no domain"):
        parse_path("<postmaster>", allow_local_only=False)


def test_brackets_optional_when_not_strict():
    assert parse_path("user@example.org", brackets_required=False) == "user@example.org"


class TestLengthLimits:
    def test_local_part_64_ok_65_refused(self):
        assert parse_path(f"<{'a' * 64}@example.org>") == f"{'a' * 64}@example.org"
        with pytest.raises(AddressError, match="local part longer than 64"):
            parse_path(f"<{'a' * 65}@example.org>")

    def test_quoted_local_part_counts_quotes(self):
        with pytest.raises(AddressError, match="local part longer than 64"):
            parse_path(f"<\"{'a b' * 21}\"@example.org>")

    def test_label_63_ok_64_refused(self):
        assert parse_domain("a" * 63 + ".example")
        with pytest.raises(AddressError, match="label longer than 63"):
            parse_domain("a" * 64 + ".example")

    def test_domain_255_ok_256_refused(self):
        domain = ".".join(["a" * 63] * 4)[:255]
        domain = domain.rstrip(".")
        assert len(domain) <= 255
        assert parse_domain(domain) == domain
        with pytest.raises(AddressError, match="longer than 255"):
            parse_domain("a." * 127 + "ab")

    def test_path_256_limit(self):
        domain = ".".join(["b" * 60] * 3) + "." + "c" * 62   # 245 octets
        local = "a" * 8
        path = f"<{local}@{domain}>"            # 2 + 8 + 1 + 245 = 256
        assert len(path) == 256
        assert parse_path(path) == f"{local}@{domain}"
        with pytest.raises(AddressError, match="path longer than 256"):
            parse_path(f"<a{local}@{domain}>")

    def test_utf8_length_counted_in_octets(self):
        local = "\u00e9" * 33                    # 66 octets, 33 characters
        with pytest.raises(AddressError, match="local part longer than 64"):
            parse_path(f"<{local}@example.org>", smtputf8=True)

    def test_huge_input_refused_fast(self):
        with pytest.raises(AddressError, match="path longer"):
            parse_path("<" + "a" * 1_000_000 + "@example.org>")


class TestSMTPUTF8:
    def test_non_ascii_local_needs_smtputf8(self):
        with pytest.raises(NeedsSMTPUTF8, match="requires SMTPUTF8"):
            parse_path("<j\u00f6rg@example.org>")
        assert parse_path("<j\u00f6rg@example.org>", smtputf8=True) == "j\u00f6rg@example.org"

    def test_non_ascii_domain_needs_smtputf8(self):
        with pytest.raises(NeedsSMTPUTF8):
            parse_path("<a@b\u00fccher.example>")
        assert parse_path("<a@b\u00fccher.example>", smtputf8=True) == "a@b\u00fccher.example"

    def test_non_ascii_quoted_local(self):
        with pytest.raises(NeedsSMTPUTF8):
            parse_path("<\"\u00e9 x\"@example.org>")
        assert parse_path("<\"\u00e9 x\"@example.org>", smtputf8=True) == "\"\u00e9 x\"@example.org"

    def test_needs_smtputf8_is_address_error(self):
        assert issubclass(NeedsSMTPUTF8, AddressError)

    def test_non_ascii_does_not_excuse_bad_syntax(self):
        with pytest.raises(AddressError):
            parse_path("<a..\u00e9@example.org>", smtputf8=True)

    def test_non_ascii_digits_not_an_ip_literal(self):
        with pytest.raises(AddressError):
            parse_path("<a@[\u0661.2.3.4]>", smtputf8=True)


class TestSplitPathAndParams:
    @pytest.mark.parametrize("arg, expected", [
        ("<a@b.example>", ("<a@b.example>", "")),
        ("<a@b.example> SIZE=10 BODY=8BITMIME", ("<a@b.example>", " SIZE=10 BODY=8BITMIME")),
        (" <a@b.example>", ("<a@b.example>", "")),
        ("<> SIZE=1", ("<>", " SIZE=1")),
        ("<\"a>b\"@b.example> X", ("<\"a>b\"@b.example>", " X")),
        ("<\"a\\\">b\"@b.example>", ("<\"a\\\">b\"@b.example>", "")),
        ("a@b.example SIZE=1", ("a@b.example", "SIZE=1")),
    ])
    def test_split(self, arg, expected):
        assert split_path_and_params(arg) == expected

    @pytest.mark.parametrize("arg, reason", [
        ("", "missing address"),
        ("<a@b.example", "missing '>'"),
        ("<a@b.example>SIZE=1", "garbage after '>'"),
        ("<\"a>", "missing '>'"),
    ])
    def test_split_errors(self, arg, reason):
        with pytest.raises(AddressError, match=reason):
            split_path_and_params(arg)

    def test_strict_requires_brackets(self):
        with pytest.raises(AddressError, match="enclosed"):
            split_path_and_params("a@b.example", brackets_required=True)


class TestESMTPParams:
    def test_keys_upper_values_kept(self):
        assert parse_esmtp_params(" size=10 Body=8BITMIME smtputf8") == {
            "SIZE": "10", "BODY": "8BITMIME", "SMTPUTF8": None}

    def test_empty(self):
        assert parse_esmtp_params("") == {}
        assert parse_esmtp_params("   ") == {}

    @pytest.mark.parametrize("text, reason", [
        ("SIZE=1 SIZE=2", "duplicate parameter SIZE"),
        ("SIZE=", "empty value"),
        ("-X=1", "invalid parameter keyword"),
        ("X_Y=1", "invalid parameter keyword"),
        ("=1", "invalid parameter keyword"),
        ("X=a=b", "invalid character"),
        ("X=\x01", "invalid character"),
        ("X=\u00e9", "invalid character"),
        (" ".join(f"X{i}" for i in range(33)), "too many parameters"),
    ])
    def test_errors(self, text, reason):
        with pytest.raises(AddressError, match=reason):
            parse_esmtp_params(text)

    def test_utf8_values_with_flag(self):
        assert parse_esmtp_params("X=\u00e9", utf8=True) == {"X": "\u00e9"}


class TestXtext:
    def test_valid(self):
        assert is_xtext("abc+2B+3D")
        assert decode_xtext("a+2Bb+3Dc") == "a+b=c"
        assert is_xtext("")

    @pytest.mark.parametrize("text", ["a+b", "a=b", "a b", "+2b", "+2", "\u00e9"])
    def test_invalid(self, text):
        assert not is_xtext(text)
        with pytest.raises(AddressError):
            decode_xtext(text)


class TestSplitAndQuote:
    @pytest.mark.parametrize("addr, expected", [
        ("user@example.org", ("user", "example.org")),
        ("\"a@b\"@example.org", ("\"a@b\"", "example.org")),
        ("\"a\\\"@b\"@example.org", ("\"a\\\"@b\"", "example.org")),
        ("postmaster", ("postmaster", "")),
        ("", ("", "")),
        ("u@[192.0.2.1]", ("u", "[192.0.2.1]")),
    ])
    def test_split_address(self, addr, expected):
        assert split_address(addr) == expected

    @pytest.mark.parametrize("value, quoted", [
        ("abc", "abc"),
        ("a.b", "a.b"),
        ("a b", "\"a b\""),
        ("a\"b", "\"a\\\"b\""),
        ("a\\b", "\"a\\\\b\""),
        (".a", "\".a\""),
        ("", "\"\""),
    ])
    def test_quote_unquote_round_trip(self, value, quoted):
        assert quote_local(value) == quoted
        assert unquote_local(quoted) == value


def test_parse_mailbox_directly():
    assert parse_mailbox("a@b.example") == "a@b.example"
    with pytest.raises(AddressError, match="empty local part"):
        parse_mailbox("@b.example")
    with pytest.raises(AddressError, match="empty address"):
        parse_mailbox("")


_local_values = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30)


@settings(max_examples=300, deadline=None)
@given(_local_values)
def test_any_ascii_local_part_round_trips_through_quoting(value):
    path = f"<{quote_local(value)}@example.org>"
    if len(path.encode()) > 256 or len(quote_local(value)) > 64:
        return
    canonical = parse_path(path)
    local, domain = split_address(canonical)
    assert domain == "example.org"
    assert unquote_local(local) == value
    assert parse_path(f"<{canonical}>") == canonical


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=300), st.booleans())
def test_random_text_gives_a_string_or_address_error(text, utf8):
    try:
        result = parse_path(text, smtputf8=utf8)
    except AddressError as exc:
        assert str(exc)
    else:
        assert isinstance(result, str)
        assert len(result.encode("utf-8")) <= 256
        if not utf8:
            assert result.isascii()
    try:
        params = parse_esmtp_params(text, utf8=utf8)
    except AddressError as exc:
        assert str(exc)
    else:
        assert all(k.isupper() or k.isdigit() or "-" in k for k in params)


def test_parse_mailbox_cache_keeps_errors_and_options_apart():
    # The result cache must not turn an error into a success, nor answer
    # one set of options with another's result.
    for _ in range(2):
        with pytest.raises(AddressError):
            parse_mailbox("postmaster")
        assert parse_mailbox("postmaster", allow_local_only=True) == "postmaster"
        with pytest.raises(NeedsSMTPUTF8):
            parse_mailbox("j\u00f6rg@example.org")
        assert parse_mailbox("j\u00f6rg@example.org", smtputf8=True) == "j\u00f6rg@example.org"
