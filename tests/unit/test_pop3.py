"""Transcript tests for the sans-IO POP3 server engine (pymta.core.proto.pop3).

Client bytes go in, exact reply bytes come out. `Driver` answers the
engine's decisions the way pop3d does, from a small in-memory mailbox.
"""

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pymta.core.proto.pop3 import (
    PLAINTEXT_DISALLOWED,
    RESP_IN_USE,
    RESP_SYS_TEMP,
    AuthResponse,
    AuthStart,
    Close,
    CloseReason,
    MessageEncoder,
    Pass,
    POP3Server,
    Pop3Settings,
    Reply,
    Retrieve,
    StartTLS,
    State,
    Update,
    WireSizer,
    wire_size,
)

S_GREETING = b"+OK pymta ready.\r\n"
S_OK = b"+OK\r\n"
S_LOGGED_IN = b"+OK Logged in.\r\n"
S_AUTH_FAILED = b"-ERR [AUTH] Authentication failed.\r\n"
S_PLAINTEXT = b"-ERR [AUTH] " + PLAINTEXT_DISALLOWED.encode() + b"\r\n"
S_UNKNOWN = b"-ERR Unknown command.\r\n"
S_BYE = b"+OK Logging out.\r\n"
S_BYE_DELETED = b"+OK Logging out, messages deleted.\r\n"
S_BEGIN_TLS = b"+OK Begin TLS negotiation now.\r\n"
S_DELETED = b"+OK Marked to be deleted.\r\n"
S_IS_DELETED = b"-ERR Message is deleted.\r\n"
S_TOO_LONG = b"-ERR Line too long.\r\n"
CAPA_TAIL = [b"CAPA", b"TOP", b"UIDL", b"RESP-CODES", b"PIPELINING", b"AUTH-RESP-CODE"]

MESSAGES = {
    "uid-1": b"Subject: one\n\nfirst\n.dot line\n..two dots\n",
    "uid-2": b"Subject: two\nX: y\n\nl1\nl2\nl3\nl4\n",
    "uid-3": b"Subject: three\r\n\r\nCRLF stored\r\n",
}
PASSWORD = b"s3cret word"


def capa(*extra):
    return b"+OK\r\n" + b"".join(c + b"\r\n" for c in CAPA_TAIL + list(extra)) + b".\r\n"


class Driver:
    """Plays pop3d: answers decisions, records what was written and closed."""

    def __init__(self, settings=None, messages=None, chunk=None, **kw):
        if settings is None:
            settings = Pop3Settings(**kw)
        self.engine = POP3Server(settings)
        self.messages = dict(MESSAGES if messages is None else messages)
        self.uids = list(self.messages)
        self.chunk = chunk
        self.out = bytearray()
        self.closed = None
        self.tls_started = 0
        self.decisions = []
        self.updates = []
        self.exchange = None
        self.engine.greeting("pymta ready.")
        self.pump()

    def pump(self):
        e = self.engine
        while (ev := e.next_event()) is not None:
            if isinstance(ev, Reply):
                assert self.closed is None, "reply after Close"
                self.out += ev.data
            elif isinstance(ev, Close):
                self.closed = ev.reason
            elif isinstance(ev, StartTLS):
                self.tls_started += 1
            elif isinstance(ev, Pass):
                self.decisions.append(ev)
                self.login(ev.username, ev.password)
            elif isinstance(ev, AuthStart):
                self.decisions.append(ev)
                self.auth_start(ev)
            elif isinstance(ev, AuthResponse):
                self.decisions.append(ev)
                self.auth_step(ev.line)
            elif isinstance(ev, Retrieve):
                self.decisions.append(ev)
                self.retrieve(ev)
            elif isinstance(ev, Update):
                self.updates.append(ev)
                e.update_done()
            else:
                raise AssertionError(f"unexpected event {ev!r}")

    def login(self, user, password):
        if user == "alice" and password == PASSWORD:
            self.engine.login_ok(self.uids, [wire_size(self.messages[u]) for u in self.uids])
        elif user == "busy":
            self.engine.login_failed("Mailbox is locked by another POP3 session", RESP_IN_USE,
                                     count=False, close=True)
        else:
            self.engine.login_failed()

    def auth_start(self, ev):
        initial = ev.initial_response
        if ev.mechanism == "PLAIN":
            if initial is None:
                self.exchange = "PLAIN"
                self.engine.auth_continue(b"")
                return
            self.plain(initial)
        else:
            self.exchange = "LOGIN-USER"
            self.engine.auth_continue(b"Username:")

    def plain(self, text):
        _, user, password = base64.b64decode(text).split(b"\0")
        self.login(user.decode(), password)

    def auth_step(self, line):
        if line == b"*":
            self.engine.login_failed("Authentication aborted by client.", None)
        elif self.exchange == "PLAIN":
            self.plain(line)
        elif self.exchange == "LOGIN-USER":
            self.user = base64.b64decode(line).decode()
            self.exchange = "LOGIN-PASS"
            self.engine.auth_continue(b"Password:")
        else:
            self.login(self.user, base64.b64decode(line))

    def retrieve(self, ev):
        data = self.messages[ev.uid]
        if ev.uid == "gone":
            self.engine.retrieve_failed()
            return
        if not self.chunk:
            self.engine.retrieve_ok(data)
            return
        parts = [data[i:i + self.chunk] for i in range(0, len(data), self.chunk)] or [b""]
        self.engine.retrieve_ok(parts[0], len(parts) > 1)
        for i, part in enumerate(parts[1:], 2):
            if not self.engine.retrieving:
                break
            self.engine.retrieve_more(part, i < len(parts))

    def send(self, data):
        """Feed client bytes; return what the server wrote in answer."""
        start = len(self.out)
        self.engine.feed(data)
        self.pump()
        return bytes(self.out[start:])


def logged_in(**kw):
    kw.setdefault("plaintext_auth", True)
    d = Driver(**kw)
    assert d.send(b"USER alice\r\nPASS " + PASSWORD + b"\r\n") == S_OK + S_LOGGED_IN
    return d


# ------------------------------------------------------------------ greeting, CAPA

def test_greeting_and_capa_on_a_plaintext_connection_without_trust():
    d = Driver(stls_available=True)
    assert bytes(d.out) == S_GREETING
    assert d.send(b"CAPA\r\n") == capa(b"STLS")


def test_capa_offers_user_and_sasl_when_plaintext_is_allowed():
    d = Driver(stls_available=True, plaintext_auth=True)
    assert d.send(b"capa\r\n") == capa(b"STLS", b"USER", b"SASL PLAIN LOGIN")


def test_capa_on_implicit_tls_has_no_stls():
    d = Driver(tls_active=True, stls_available=False)
    assert d.send(b"CAPA\r\n") == capa(b"USER", b"SASL PLAIN LOGIN")


def test_capa_after_login_lists_only_transaction_capabilities():
    d = logged_in()
    assert d.send(b"CAPA\r\n") == capa()


# ------------------------------------------------------------------ USER / PASS

def test_user_pass_login_and_quit_without_changes():
    d = logged_in()
    assert d.engine.state is State.TRANSACTION
    assert d.decisions == [Pass("alice", PASSWORD)]
    assert d.send(b"QUIT\r\n") == S_BYE
    assert d.closed is CloseReason.QUIT
    assert d.updates == []


def test_password_keeps_spaces_and_repr_hides_it():
    d = Driver(plaintext_auth=True)
    d.send(b"USER alice\r\nPASS  a b \r\n")
    assert d.decisions[0].password == b" a b "
    assert b"a b" not in repr(d.decisions[0]).encode()


def test_plaintext_login_refused_without_tls_outside_trusted_networks():
    d = Driver(stls_available=True)
    assert d.send(b"USER alice\r\n") == S_PLAINTEXT
    assert d.send(b"PASS " + PASSWORD + b"\r\n") == S_PLAINTEXT
    assert d.send(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0" + PASSWORD) + b"\r\n") == S_PLAINTEXT
    assert d.engine.plaintext_refused == 3
    assert d.decisions == []
    assert d.send(b"QUIT\r\n") == S_BYE


def test_pass_without_user_and_bad_user_names():
    d = Driver(plaintext_auth=True)
    assert d.send(b"PASS x\r\n") == b"-ERR No username given.\r\n"
    assert d.send(b"USER\r\n") == b"-ERR Invalid user name.\r\n"
    assert d.send(b"USER a\x01b\r\n") == b"-ERR Invalid user name.\r\n"
    assert d.send(b"USER \xff\r\n") == b"-ERR Invalid user name.\r\n"
    assert d.send(b"USER alice\r\nPASS\r\n") == S_OK + b"-ERR No password given.\r\n"


def test_failed_logins_close_the_session_after_three():
    d = Driver(plaintext_auth=True)
    for _ in range(2):
        assert d.send(b"USER alice\r\nPASS wrong\r\n") == S_OK + S_AUTH_FAILED
        assert d.closed is None
    assert d.send(b"USER alice\r\nPASS wrong\r\n") == S_OK + S_AUTH_FAILED
    assert d.closed is CloseReason.AUTH_FAILURES
    assert d.engine.auth_failures == 3
    assert d.send(b"USER alice\r\n") == b""


def test_in_use_closes_the_session():
    d = Driver(plaintext_auth=True)
    out = d.send(b"USER busy\r\nPASS x\r\nSTAT\r\n")
    assert out == S_OK + b"-ERR [IN-USE] Mailbox is locked by another POP3 session\r\n"
    assert d.closed is CloseReason.REFUSED


def test_transaction_commands_before_login():
    d = Driver(plaintext_auth=True)
    assert d.send(b"STAT\r\n") == b"-ERR Unknown command in AUTHORIZATION state.\r\n"
    assert d.send(b"XYZZY\r\n") == S_UNKNOWN


# ------------------------------------------------------------------ AUTH (RFC 5034)

def test_auth_plain_with_initial_response():
    d = Driver(plaintext_auth=True)
    ir = base64.b64encode(b"\0alice\0" + PASSWORD)
    assert d.send(b"AUTH PLAIN " + ir + b"\r\n") == S_LOGGED_IN
    assert d.decisions == [AuthStart("PLAIN", ir)]


def test_auth_plain_with_empty_challenge():
    d = Driver(plaintext_auth=True)
    assert d.send(b"AUTH plain\r\n") == b"+ \r\n"
    assert d.engine.state is State.SASL
    assert d.send(base64.b64encode(b"\0alice\0" + PASSWORD) + b"\r\n") == S_LOGGED_IN


def test_auth_login_two_challenges():
    d = Driver(plaintext_auth=True)
    assert d.send(b"AUTH LOGIN\r\n") == b"+ " + base64.b64encode(b"Username:") + b"\r\n"
    assert d.send(base64.b64encode(b"alice") + b"\r\n") == b"+ " + base64.b64encode(b"Password:") + b"\r\n"
    assert d.send(base64.b64encode(PASSWORD) + b"\r\n") == S_LOGGED_IN


def test_auth_cancel_and_unknown_mechanism_and_listing():
    d = Driver(plaintext_auth=True)
    assert d.send(b"AUTH PLAIN\r\n*\r\n") == b"+ \r\n-ERR Authentication aborted by client.\r\n"
    assert d.engine.state is State.AUTHORIZATION
    assert d.send(b"AUTH CRAM-MD5\r\n") == b"-ERR Unsupported authentication mechanism.\r\n"
    assert d.send(b"AUTH\r\n") == b"+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n"
    assert d.send(b"AUTH PLAIN a b\r\n") == b"-ERR Syntax: AUTH mechanism [initial-response]\r\n"


def test_bare_auth_lists_nothing_when_plaintext_is_refused():
    d = Driver()
    assert d.send(b"AUTH\r\n") == b"+OK\r\n.\r\n"


def test_long_initial_response_is_accepted_up_to_the_auth_limit():
    d = Driver(plaintext_auth=True)
    ir = b"A" * 12000
    d.engine.feed(b"AUTH PLAIN " + ir + b"\r\n")
    ev = d.engine.next_event()
    assert ev == AuthStart("PLAIN", ir)


def test_sasl_response_too_long_aborts_the_exchange():
    d = Driver(plaintext_auth=True)
    d.send(b"AUTH PLAIN\r\n")
    assert d.send(b"A" * 13000 + b"\r\n") == S_TOO_LONG
    assert d.engine.state is State.AUTHORIZATION


# ------------------------------------------------------------------ STLS (RFC 2595)

def test_stls_discards_pipelined_plaintext_and_starts_over():
    d = Driver(stls_available=True)
    out = d.send(b"STLS\r\nUSER alice\r\nPASS " + PASSWORD + b"\r\n")
    assert out == S_BEGIN_TLS
    assert d.tls_started == 1
    assert d.engine.state is State.STLS
    assert d.engine.discarded_after_stls == len(b"USER alice\r\nPASS ") + len(PASSWORD) + 2
    d.engine.feed(b"CAPA\r\n")              # still during the handshake: dropped
    assert d.engine.discarded_after_stls > 30
    d.engine.tls_started()
    d.pump()
    assert d.decisions == []
    assert d.send(b"CAPA\r\n") == capa(b"USER", b"SASL PLAIN LOGIN")
    assert d.send(b"STLS\r\n") == b"-ERR TLS is already active.\r\n"
    assert d.send(b"USER alice\r\nPASS " + PASSWORD + b"\r\n") == S_OK + S_LOGGED_IN


def test_stls_unavailable():
    d = Driver(stls_available=False)
    assert d.send(b"STLS\r\n") == b"-ERR TLS support isn't enabled.\r\n"
    assert d.tls_started == 0


def test_stls_is_not_a_transaction_command():
    d = logged_in(stls_available=True)
    assert d.send(b"STLS\r\n") == b"-ERR Unknown command in TRANSACTION state.\r\n"


def test_tls_started_outside_stls_is_a_driver_error():
    d = Driver()
    with pytest.raises(RuntimeError):
        d.engine.tls_started()


# ------------------------------------------------------------------ TRANSACTION

def sizes():
    return [wire_size(MESSAGES[u]) for u in MESSAGES]


def test_stat_list_uidl():
    d = logged_in()
    s = sizes()
    assert s == [len(MESSAGES["uid-1"]) + 5, len(MESSAGES["uid-2"]) + 7, len(MESSAGES["uid-3"])]
    assert d.send(b"STAT\r\n") == f"+OK 3 {sum(s)}\r\n".encode()
    assert d.send(b"LIST\r\n") == (f"+OK 3 messages:\r\n1 {s[0]}\r\n2 {s[1]}\r\n3 {s[2]}\r\n.\r\n"
                                   .encode())
    assert d.send(b"LIST 2\r\n") == f"+OK 2 {s[1]}\r\n".encode()
    assert d.send(b"UIDL\r\n") == b"+OK\r\n1 uid-1\r\n2 uid-2\r\n3 uid-3\r\n.\r\n"
    assert d.send(b"UIDL 3\r\n") == b"+OK 3 uid-3\r\n"


def test_retr_converts_line_ends_and_stuffs_dots():
    d = logged_in()
    out = d.send(b"RETR 1\r\n")
    assert out == (f"+OK {sizes()[0]} octets\r\n".encode()
                   + b"Subject: one\r\n\r\nfirst\r\n..dot line\r\n...two dots\r\n.\r\n")
    out = d.send(b"RETR 3\r\n")
    assert out == b"+OK %d octets\r\nSubject: three\r\n\r\nCRLF stored\r\n.\r\n" % sizes()[2]
    assert d.engine.retr_count == 2


def test_top_sends_header_blank_line_and_n_body_lines():
    d = logged_in()
    assert d.send(b"TOP 2 0\r\n") == b"+OK\r\nSubject: two\r\nX: y\r\n\r\n.\r\n"
    assert d.send(b"TOP 2 2\r\n") == b"+OK\r\nSubject: two\r\nX: y\r\n\r\nl1\r\nl2\r\n.\r\n"
    assert d.send(b"TOP 2 99\r\n") == (b"+OK\r\nSubject: two\r\nX: y\r\n\r\nl1\r\nl2\r\nl3\r\nl4\r\n"
                                       b".\r\n")
    assert d.send(b"TOP 2 99999999999999999999999\r\n").endswith(b"l4\r\n.\r\n")
    assert d.send(b"TOP 2\r\n") == b"-ERR Syntax: TOP msg lines\r\n"
    assert d.send(b"TOP 2 x\r\n") == b"-ERR Invalid number of lines.\r\n"
    assert d.engine.top_count == 4
    assert d.engine.retr_count == 0


def test_chunked_retrieval_gives_the_same_bytes():
    whole = logged_in()
    chunked = logged_in(chunk=3)
    for cmd in (b"RETR 1\r\n", b"RETR 2\r\n", b"RETR 3\r\n", b"TOP 2 1\r\n", b"TOP 1 0\r\n"):
        assert chunked.send(cmd) == whole.send(cmd)


def test_dele_rset_and_errors_on_message_numbers():
    d = logged_in()
    s = sizes()
    assert d.send(b"DELE 1\r\n") == S_DELETED
    assert d.send(b"DELE 1\r\n") == S_IS_DELETED
    assert d.send(b"RETR 1\r\n") == S_IS_DELETED
    assert d.send(b"STAT\r\n") == f"+OK 2 {s[1] + s[2]}\r\n".encode()
    assert d.send(b"LIST\r\n") == f"+OK 2 messages:\r\n2 {s[1]}\r\n3 {s[2]}\r\n.\r\n".encode()
    assert d.send(b"UIDL\r\n") == b"+OK\r\n2 uid-2\r\n3 uid-3\r\n.\r\n"
    assert d.send(b"RETR 4\r\n") == b"-ERR There's no message 4.\r\n"
    assert d.send(b"RETR 0\r\n") == b"-ERR There's no message 0.\r\n"
    assert d.send(b"RETR x\r\n") == b"-ERR Invalid message number: x\r\n"
    assert d.send(b"RETR 1 2\r\n") == b"-ERR Syntax: RETR msg\r\n"
    assert d.send(b"RETR 99999999999\r\n") == b"-ERR Invalid message number: 99999999999\r\n"
    assert d.send(b"RSET\r\n") == S_OK
    assert d.send(b"STAT\r\n") == f"+OK 3 {sum(s)}\r\n".encode()
    assert d.send(b"NOOP\r\n") == S_OK


def test_quit_enters_update_with_deleted_and_seen():
    d = logged_in()
    d.send(b"RETR 1\r\nRETR 2\r\nDELE 2\r\nTOP 3 0\r\n")
    assert d.send(b"QUIT\r\n") == S_BYE_DELETED
    assert d.updates == [Update(deleted=(1,), seen=(0,))]
    assert d.closed is CloseReason.QUIT
    assert d.engine.counters() == (f"top=1/{len(b'Subject: three') + 4}, "
                                   f"retr=2/{d.engine.retr_bytes}, del=1/3, size={sum(sizes())}")


def test_rset_forgets_retrieved_messages_too():
    d = logged_in()
    d.send(b"RETR 1\r\nRSET\r\n")
    assert d.send(b"QUIT\r\n") == S_BYE
    assert d.updates == []


def test_update_failure_is_reported():
    d = logged_in()
    d.engine.feed(b"DELE 1\r\nQUIT\r\n")
    events = []
    while (ev := d.engine.next_event()) is not None:
        events.append(ev)
    assert isinstance(events[-1], Update)
    d.engine.update_done("Some deleted messages were not removed.", 0)
    assert d.engine.next_event().data == b"-ERR [SYS/TEMP] Some deleted messages were not removed.\r\n"
    assert isinstance(d.engine.next_event(), Close)
    assert "del=0/3" in d.engine.counters()


def test_retrieve_failed_when_the_message_is_gone():
    d = logged_in(messages={"gone": b"x\n", "uid-2": b"y\n"})
    assert d.send(b"RETR 1\r\nRETR 2\r\n") == (b"-ERR Message no longer exists.\r\n"
                                               b"+OK 3 octets\r\ny\r\n.\r\n")


def test_empty_maildrop():
    d = logged_in(messages={})
    assert d.send(b"STAT\r\nLIST\r\nUIDL\r\n") == b"+OK 0 0\r\n+OK 0 messages:\r\n.\r\n+OK\r\n.\r\n"


# ------------------------------------------------------------------ pipelining, limits

def test_pipelined_commands_are_answered_in_order():
    d = Driver(plaintext_auth=True)
    out = d.send(b"USER alice\r\nPASS " + PASSWORD + b"\r\nSTAT\r\nUIDL 1\r\nRETR 2\r\nNOOP\r\nQUIT\r\n")
    assert out.startswith(S_OK + S_LOGGED_IN + b"+OK 3 ")
    assert out.endswith(b"l4\r\n.\r\n+OK\r\n" + S_BYE)
    assert d.updates == [Update(deleted=(), seen=(1,))]


def test_decision_holds_back_later_commands():
    d = Driver(plaintext_auth=True)
    d.engine.feed(b"USER alice\r\nPASS " + PASSWORD + b"\r\nSTAT\r\n")
    assert d.engine.next_event() == Reply(S_OK)
    assert isinstance(d.engine.next_event(), Pass)
    assert d.engine.next_event() is None
    assert d.engine.awaiting_decision
    d.engine.login_ok(["a"], [3])
    assert d.engine.next_event() == Reply(S_LOGGED_IN)
    assert d.engine.next_event() == Reply(b"+OK 1 3\r\n")


def test_commands_split_across_reads_and_bare_lf():
    d = Driver(plaintext_auth=True)
    assert d.send(b"CA") == b""
    assert d.send(b"PA\r") == b""
    assert d.send(b"\n").startswith(b"+OK\r\nCAPA\r\n")
    assert d.send(b"NOOPX\n") == S_UNKNOWN


def test_line_too_long_is_skipped_without_buffering():
    d = Driver(plaintext_auth=True)
    assert d.send(b"NOOP " + b"x" * 5000) == b""
    assert d.engine.buffered == 0
    assert d.send(b"y" * 5000) == b""
    assert d.send(b"\r\nCAPA\r\n").startswith(S_TOO_LONG + b"+OK\r\nCAPA")


def test_nul_and_bad_command_limit():
    d = Driver(plaintext_auth=True)
    assert d.send(b"US\0ER x\r\n") == b"-ERR NUL character in command.\r\n"
    out = d.send(b"BAD\r\n" * 20)
    assert out == S_UNKNOWN * 9 + b"-ERR Too many bad commands.\r\n"
    assert d.closed is CloseReason.BAD_COMMANDS


def test_http_request_gets_errors_not_a_crash():
    d = Driver()
    out = d.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out == S_UNKNOWN * 3


def test_timeout_sends_a_last_reply_and_closes():
    d = logged_in()
    d.send(b"DELE 1\r\n")
    d.engine.timeout()
    d.pump()
    assert bytes(d.out).endswith(b"-ERR Disconnected for inactivity.\r\n")
    assert d.closed is CloseReason.TIMEOUT
    assert d.updates == []


def test_abort_with_response_code():
    d = Driver()
    d.engine.abort("Server shutting down.", RESP_SYS_TEMP)
    d.pump()
    assert bytes(d.out).endswith(b"-ERR [SYS/TEMP] Server shutting down.\r\n")
    assert d.engine.closed


def test_driver_misuse_raises():
    d = Driver(plaintext_auth=True)
    with pytest.raises(RuntimeError):
        d.engine.login_ok([], [])
    with pytest.raises(RuntimeError):
        d.engine.retrieve_ok(b"x")
    with pytest.raises(RuntimeError):
        d.engine.greeting()
    d.engine.feed(b"USER a\r\nPASS b\r\n")
    assert d.engine.next_event() == Reply(S_OK)
    assert isinstance(d.engine.next_event(), Pass)
    with pytest.raises(ValueError):
        d.engine.login_ok(["a"], [])
    with pytest.raises(RuntimeError):
        d.engine.update_done()


def test_settings_limits():
    with pytest.raises(ValueError):
        Pop3Settings(line_length_limit=100)
    with pytest.raises(ValueError):
        Pop3Settings(max_bad_commands=0)
    assert Pop3Settings(auth_mechanisms=("plain",)).auth_mechanisms == ("PLAIN",)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_the_engine_never_raises(data):
    d = Driver(plaintext_auth=True, stls_available=True)
    for cut in range(0, len(data), 7):
        d.engine.feed(data[cut:cut + 7])
        d.pump()
        if d.tls_started and d.engine.state is State.STLS:
            d.engine.tls_started()
    assert d.out.startswith(S_GREETING)


# ------------------------------------------------------------------ content encoding

def reference(data, top=None):
    """Line by line, the way RFC 1939 describes it."""
    if data.endswith(b"\r"):
        data += b"\n"
    data = data.replace(b"\r\n", b"\n")
    if data and not data.endswith(b"\n"):
        data += b"\n"
    lines = data.split(b"\n")[:-1] if data else []
    if top is not None:
        try:
            blank = lines.index(b"")
        except ValueError:
            blank = len(lines)
        lines = lines[:blank + 1 + top]
    body = b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
    return body + b".\r\n", sum(len(ln) + 2 for ln in lines)


def encode(data, cuts, top=None):
    enc = MessageEncoder(top)
    out = bytearray()
    start = 0
    for cut in sorted(cuts) + [len(data)]:
        out += enc.feed(data[start:cut])
        start = max(start, cut)
    out += enc.finish()
    return bytes(out), enc.sent


message_bytes = st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"..", b"\n.",
                                          b"xyz", b"\n\n"]), max_size=40).map(b"".join)


@settings(max_examples=500, deadline=None)
@given(message_bytes, st.lists(st.integers(0, 120), max_size=6),
       st.one_of(st.none(), st.integers(0, 5)))
def test_encoder_matches_the_line_by_line_reference(data, cuts, top):
    expected, unstuffed = reference(data, top)
    got, sent = encode(data, cuts, top)
    assert got == expected
    assert sent == len(got) - 3
    if top is None:
        assert wire_size(data) == unstuffed
        sizer = WireSizer()
        start = 0
        for cut in sorted(cuts) + [len(data)]:
            sizer.feed(data[start:cut])
            start = max(start, cut)
        assert sizer.result() == unstuffed


def test_wire_size_examples():
    assert wire_size(b"") == 0
    assert wire_size(b"a\n") == 3
    assert wire_size(b"a\r\n") == 3
    assert wire_size(b"a") == 3
    assert wire_size(b"a\r") == 3
    assert wire_size(b"a\rb\n") == 5
    assert WireSizer().result() == 0


def test_top_stops_reading_early():
    enc = MessageEncoder(1)
    assert enc.feed(b"H: 1\n\nbody 1\nbody 2\n") == b"H: 1\r\n\r\nbody 1\r\n"
    assert enc.done
    assert enc.feed(b"more\n") == b""
    assert enc.finish() == b".\r\n"


def test_abort_in_the_middle_of_a_message_sends_nothing_more():
    d = logged_in()
    d.engine.feed(b"RETR 2\r\n")
    assert isinstance(d.engine.next_event(), Retrieve)
    d.engine.retrieve_ok(b"Subject: two\n", more=True)
    assert d.engine.retrieving
    part = d.engine.next_event()
    assert part.data.startswith(b"+OK ") and part.data.endswith(b"Subject: two\r\n")
    d.engine.timeout()
    assert d.engine.next_event() == Close(CloseReason.TIMEOUT)
    assert d.engine.next_event() is None
    assert not d.engine.retrieving
