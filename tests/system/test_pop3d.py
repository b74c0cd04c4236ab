"""pop3d as users meet it: a real instance, real clients (poplib, mpop),
mail put into the Maildir with pymta.core.maildir.deliver."""

import base64
import os
import poplib
import pwd
import re
import shutil
import socket
import ssl
import subprocess
import textwrap
import time

import pytest

from pymta.core import maildir
from tests.conftest import BIN, run, wait_for

USER = "alice@test.example"
PASSWORD = "correct horse battery"
MESSAGES = [
    b"From: bob@test.example\nSubject: first\n\nHello Alice.\n.\n..a line with dots\n",
    b"From: carol@test.example\nSubject: second\n\n" + b"a fairly long line of text\n" * 400,
    b"From: dave@test.example\nSubject: third\n\nno final line end",
]


def mailbox(inst, user=USER):
    local, _, domain = user.rpartition("@")
    return inst.path("mail", domain, local)


def owner():
    """uid, gid for files the services (mail_owner) must read and rename."""
    if os.geteuid() != 0:
        return None, None
    pw = pwd.getpwnam("pymta")
    return pw.pw_uid, pw.pw_gid


def deliver(inst, data, user=USER):
    uid, gid = owner()
    return maildir.deliver(mailbox(inst, user), data, uid=uid, gid=gid)


def files(inst, user=USER):
    box = mailbox(inst, user)
    return {sub: sorted(os.listdir(os.path.join(box, sub))) for sub in ("new", "cur")}


def pop3_master_cf(inst, extra=""):
    """master.cf with the two pop3d lines that `pymta init` wrote."""
    with open(os.path.join(inst.etc, "master.cf")) as f:
        lines = [ln for ln in f if "pop3d" in ln and not ln.startswith("#")]
    assert len(lines) == 2, lines
    inst.write_master_cf("".join(lines) + extra)


@pytest.fixture
def pop(instance):
    pop3_master_cf(instance)
    instance.pymta("user", "add", USER, input=PASSWORD + "\n")
    return instance


def connect(inst, source=None):
    """poplib.POP3 on the pop3 port, optionally from another local address."""

    class POP3From(poplib.POP3):
        def _create_socket(self, timeout):
            return socket.create_connection((self.host, self.port), timeout,
                                            source_address=(source, 0) if source else None)

    return POP3From("127.0.0.1", inst.ports["pop3"], timeout=20)


def login(inst):
    p = connect(inst)
    p.user(USER)
    p.pass_(PASSWORD)
    return p


def wait_log(inst, text):
    """The log, once it holds `text`."""
    inst.wait_log(text)
    return inst.log()


def tls_context(inst):
    ctx = ssl.create_default_context(cafile=os.path.join(inst.etc, "tls", "cert.pem"))
    return ctx


# ------------------------------------------------------------------ basics

def test_poplib_retrieves_and_deletes(pop):
    paths = [deliver(pop, m) for m in MESSAGES]
    pop.start()
    p = login(pop)
    count, total = p.stat()
    assert count == 3
    _, listing, _ = p.list()
    sizes = [int(line.split()[1]) for line in listing]
    assert sum(sizes) == total
    _, uidls, _ = p.uidl()
    assert [u.split()[1].decode() for u in uidls] == [os.path.basename(x) for x in paths]
    for n, message in enumerate(MESSAGES, 1):
        _, lines, octets = p.retr(n)
        # poplib counts the bytes it received, without the byte-stuffing.
        assert octets == sizes[n - 1]
        assert b"\n".join(lines) == message.rstrip(b"\n")
    _, top, _ = p.top(2, 1)
    assert top == [b"From: carol@test.example", b"Subject: second", b"", b"a fairly long line of text"]
    assert p.dele(2).startswith(b"+OK")
    assert p.quit() == b"+OK Logging out, messages deleted."
    left = files(pop)
    assert left["new"] == []
    base = [os.path.basename(x) for x in paths]
    assert left["cur"] == [base[0] + ":2,S", base[2] + ":2,S"]
    log = wait_log(pop, "Disconnected: Logged out")
    assert ("pymta/pop3d[" in log and f"Login: user=<{USER}>, method=PLAIN, rip=127.0.0.1, "
            f"lip=127.0.0.1, mpid=" in log and ", secured, session=<" in log)
    retr_bytes = sum(sizes) + 2                 # two dot-stuffed lines
    top_bytes = sum(len(line) + 2 for line in top)
    assert f"Disconnected: Logged out top=1/{top_bytes}, " in log
    assert f"retr=3/{retr_bytes}, del=1/3, size={total}" in log


def test_sizes_as_sent_are_exact_and_cached(pop):
    # The last one is read and sent in several chunks.
    odd = [b"a\r\nmixed\nline ends\r\n", b"", b".\n", b"bare\rcr\n", b"x" * 2000 + b"\n" * 300,
           (b"y" * 2000 + b"\n.\n") * 200]
    for m in odd:
        deliver(pop, m)
    pop.start()
    for _ in range(2):        # the second session takes the sizes from the cache file
        p = login(pop)
        _, listing, _ = p.list()
        for line in listing:
            n, size = map(int, line.split())
            _, _, octets = p.retr(n)
            assert octets == size
        p.quit()
    with open(os.path.join(mailbox(pop), "pymta-pop3.sizes")) as f:
        cache = f.read().splitlines()
    assert cache[0] == "pymta-pop3-sizes 1" and cache[-1] == "end 6"


def test_auth_plain_with_initial_response_over_a_raw_socket(pop):
    deliver(pop, MESSAGES[0])
    pop.start()
    with socket.create_connection(("127.0.0.1", pop.ports["pop3"]), 20) as s:
        f = s.makefile("rwb")
        assert f.readline() == b"+OK pymta ready.\r\n"
        ir = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
        # Pipelined: the answers come back in order.
        f.write(b"AUTH PLAIN " + ir + b"\r\nSTAT\r\nQUIT\r\n")
        f.flush()
        assert f.readline() == b"+OK Logged in.\r\n"
        assert f.readline().startswith(b"+OK 1 ")
        assert f.readline() == b"+OK Logging out.\r\n"
    assert f"Login: user=<{USER}>, method=PLAIN" in wait_log(pop, "method=PLAIN")


# ------------------------------------------------------------------ UIDL, sessions

def test_uidl_stable_across_reconnects_restart_and_imap_renames(pop):
    paths = [deliver(pop, m) for m in MESSAGES]
    bases = [os.path.basename(x) for x in paths]
    pop.start()

    def uidls():
        p = login(pop)
        _, lines, _ = p.uidl()
        p.quit()
        return [line.split()[1].decode() for line in lines]

    assert uidls() == bases
    assert uidls() == bases
    pop.stop()
    pop.start()
    assert uidls() == bases
    # An IMAP client flags message 1 (moves it to cur/ with :2,F) while a
    # POP3 session is open; the session still retrieves it, and QUIT adds S.
    p = login(pop)
    cur = os.path.join(mailbox(pop), "cur", bases[0] + ":2,F")
    os.rename(paths[0], cur)
    _, lines, _ = p.retr(1)
    assert lines[1] == b"Subject: first"
    p.quit()
    assert files(pop)["cur"] == [bases[0] + ":2,FS"]
    assert uidls() == bases


def test_dropped_connection_keeps_everything(pop):
    for m in MESSAGES:
        deliver(pop, m)
    pop.start()
    before = files(pop)
    p = login(pop)
    p.retr(1)
    p.dele(1)
    p.dele(2)
    p.close()                 # no QUIT
    wait_log(pop, "Disconnected: Connection closed")
    assert files(pop) == before
    p = login(pop)
    assert p.stat()[0] == 3
    p.quit()


def test_second_session_gets_in_use(pop):
    deliver(pop, MESSAGES[0])
    pop.start()
    first = login(pop)
    second = connect(pop)
    second.user(USER)
    with pytest.raises(poplib.error_proto) as err:
        second.pass_(PASSWORD)
    assert err.value.args[0] == b"-ERR [IN-USE] Mailbox is locked by another POP3 session"
    assert second.file.readline() == b""          # the server closed it
    second.close()
    assert first.stat()[0] == 1
    first.quit()
    third = login(pop)
    assert third.stat()[0] == 1
    third.quit()
    assert "Disconnected: Mailbox is locked by another POP3 session" in pop.log()


def test_session_open_at_reload_is_told_server_shutting_down(pop):
    deliver(pop, MESSAGES[0])
    pop.start()
    p = login(pop)
    assert p.stat()[0] == 1
    pop.pymta("reload")
    # The old process drains its sessions for up to 10 s, then ends them
    # with a [SYS/TEMP] reply; nothing changed in the mailbox.
    p.sock.settimeout(30)
    line = p.file.readline()
    assert line == b"-ERR [SYS/TEMP] Server shutting down.\r\n"
    p.close()
    again = login(pop)
    assert again.stat()[0] == 1
    again.quit()


def test_idle_session_times_out(pop):
    pop.postconf_e(pop3d_timeout="2s")
    deliver(pop, MESSAGES[0])
    pop.start()
    p = login(pop)
    p.dele(1)
    assert p.file.readline() == b"-ERR Disconnected for inactivity.\r\n"
    assert p.file.readline() == b""
    wait_log(pop, "Disconnected: Inactivity top=0/0, retr=0/0, del=0/1")
    assert len(files(pop)["new"]) == 1


# ------------------------------------------------------------------ TLS

def mpop_config(inst, tmp_path):
    """An mpop account for USER with STLS, delivering to tmp_path/Maildir."""
    target = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (target / sub).mkdir(parents=True)
    conf = tmp_path / "mpoprc"
    conf.write_text(textwrap.dedent(f"""\
        defaults
        tls on
        tls_starttls on
        tls_trust_file {inst.etc}/tls/cert.pem
        tls_host_override mx.test.example
        uidls_file {tmp_path}/uidls
        delivery maildir {target}

        account test
        host 127.0.0.1
        port {inst.ports["pop3"]}
        user {USER}
        auth plain
        password {PASSWORD}
        """))
    conf.chmod(0o600)
    return ["mpop", "-q", "-C", str(conf), "test"], target


def test_mpop_with_stls_keeps_then_deletes(pop, tmp_path):
    for m in MESSAGES:
        deliver(pop, m)
    pop.start()
    mpop, target = mpop_config(pop, tmp_path)
    run(mpop + ["--keep=on"])
    assert len(os.listdir(target / "new")) == 3
    got = sorted((target / "new" / name).read_bytes() for name in os.listdir(target / "new"))
    for m in MESSAGES:
        assert any(m.rstrip(b"\n") in g.replace(b"\r\n", b"\n") for g in got)
    # The same UIDLs on the next run: nothing new is fetched.
    run(mpop + ["--keep=on"])
    assert len(os.listdir(target / "new")) == 3
    run(mpop + ["--keep=off", "--only-new=off"])
    assert len(os.listdir(target / "new")) == 6
    assert files(pop) == {"new": [], "cur": []}
    log = pop.log()
    assert log.count(f"Login: user=<{USER}>, method=PLAIN, rip=127.0.0.1") == 3
    assert ", TLS, session=<" in log


def test_sendmail_local_delivery_then_mpop(instance, tmp_path):
    """The whole path: sendmail, pickup, qmgr, local into the Maildir, mpop."""
    instance.pymta("user", "add", USER, input=PASSWORD + "\n")
    instance.start()
    body = b"Subject: via sendmail\n\nHello Alice,\n.\nbye\n"
    run([os.path.join(BIN, "sendmail"), "-C", instance.etc, "-i", "-f", "bob@test.example", USER],
        input=body)
    new = os.path.join(mailbox(instance), "new")
    wait_for(lambda: os.path.isdir(new) and os.listdir(new), what="local delivery")
    mpop, target = mpop_config(instance, tmp_path)
    run(mpop + ["--keep=off"])
    got = [(target / "new" / name).read_bytes() for name in os.listdir(target / "new")]
    assert len(got) == 1
    assert got[0].replace(b"\r\n", b"\n").endswith(b"\n\nHello Alice,\n.\nbye\n")
    assert b"Subject: via sendmail" in got[0]
    assert files(instance) == {"new": [], "cur": []}
    assert "retr=1/" in wait_log(instance, "Disconnected: Logged out")


def test_pop3s_with_poplib(pop):
    deliver(pop, MESSAGES[0])
    pop.start()
    p = poplib.POP3_SSL("127.0.0.1", pop.ports["pop3s"], context=tls_context(pop), timeout=20)
    assert p.getwelcome() == b"+OK pymta ready."
    assert "STLS" not in p.capa()
    p.user(USER)
    p.pass_(PASSWORD)
    assert p.stat()[0] == 1
    p.quit()
    assert ", TLS, session=<" in wait_log(pop, ", TLS, session=<")


def test_plaintext_login_refused_outside_login_trusted_networks(pop):
    deliver(pop, MESSAGES[0])
    pop.start()
    p = connect(pop, source="127.0.0.2")
    caps = p.capa()
    assert "STLS" in caps and "USER" not in caps and "SASL" not in caps
    with pytest.raises(poplib.error_proto) as err:
        p.user(USER)
    assert err.value.args[0] == (b"-ERR [AUTH] Plaintext authentication disallowed on "
                                 b"non-secure (SSL/TLS) connections.")
    p.quit()
    log = wait_log(pop, "tried to use disallowed plaintext auth")
    assert "Aborted login (tried to use disallowed plaintext auth): user=<>, rip=127.0.0.2, " in log
    # The same client with STLS first logs in.
    p = connect(pop, source="127.0.0.2")
    p.stls(tls_context(pop))
    assert "USER" in p.capa()
    p.user(USER)
    p.pass_(PASSWORD)
    assert p.stat()[0] == 1
    p.quit()
    assert "rip=127.0.0.2, lip=127.0.0.1, mpid=" in wait_log(pop, "rip=127.0.0.2, lip")


def test_plaintext_sent_after_stls_is_discarded(pop):
    pop.start()
    with socket.create_connection(("127.0.0.1", pop.ports["pop3"]), 20,
                                  source_address=("127.0.0.2", 0)) as raw:
        f = raw.makefile("rb")
        f.readline()
        raw.sendall(b"STLS\r\nCAPA\r\n")
        assert f.readline() == b"+OK Begin TLS negotiation now.\r\n"
        tls = tls_context(pop).wrap_socket(raw, server_hostname="mx.test.example")
        tf = tls.makefile("rwb")
        tf.write(b"NOOP\r\n")
        tf.flush()
        # CAPA before the handshake was dropped: the first answer is NOOP's.
        assert tf.readline() == b"-ERR Unknown command in AUTHORIZATION state.\r\n"
        tf.write(b"QUIT\r\n")
        tf.flush()
        assert tf.readline() == b"+OK Logging out.\r\n"
    assert "discarded 6 bytes of plaintext sent after STLS" in wait_log(pop, "discarded")


def test_plaintext_between_stls_reply_and_handshake_is_not_a_command(pop):
    pop.start()
    with socket.create_connection(("127.0.0.1", pop.ports["pop3"]), 20) as raw:
        f = raw.makefile("rb")
        f.readline()
        raw.sendall(b"STLS\r\n")
        assert f.readline() == b"+OK Begin TLS negotiation now.\r\n"
        raw.sendall(b"CAPA\r\n")
        time.sleep(0.2)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            tls = tls_context(pop).wrap_socket(raw, server_hostname="mx.test.example")
            tls.sendall(b"NOOP\r\n")
            tls.recv(100)
    log = wait_log(pop, "TLS handshaking failed")
    assert "Disconnected (no auth attempts in 0 secs): user=<>, rip=127.0.0.1" in log


# ------------------------------------------------------------------ failures, fail2ban

def test_failed_login_is_delayed_and_logged_for_fail2ban(pop, tmp_path):
    pop.start()
    p = connect(pop)
    p.user(USER)
    started = time.monotonic()
    with pytest.raises(poplib.error_proto) as err:
        p.pass_("wrong password")
    assert time.monotonic() - started >= 0.9
    assert err.value.args[0] == b"-ERR [AUTH] Authentication failed."
    p.quit()
    p = login(pop)
    p.quit()
    log = wait_log(pop, "Aborted login (auth failed")
    # The seconds depend on the machine's load: any whole number.
    assert re.search(rf"Aborted login \(auth failed, 1 attempts in \d+ secs\): user=<{re.escape(USER)}>, "
                     rf"method=PLAIN, rip=127\.0\.0\.1, lip=127\.0\.0\.1, secured, session=<", log), log
    assert f"auth failed: user=<{USER}>, method=PLAIN, rip=127.0.0.1, reason=password mismatch" in log
    assert "wrong password" not in log and PASSWORD not in log
    if not shutil.which("fail2ban-regex"):
        pytest.fail("fail2ban-regex is not installed (Debian package fail2ban)")
    # The filter etc/ ships, next to the stock filters it includes.
    filters = tmp_path / "filter.d"
    filters.mkdir()
    for name in ("common.conf", "dovecot.conf"):
        shutil.copy(os.path.join("/etc/fail2ban/filter.d", name), filters)
    shutil.copy(os.path.join(os.path.dirname(__file__), "..", "..", "etc", "fail2ban", "filter.d",
                             "pymta-dovecot.conf"), filters)
    filt = filters / "pymta-dovecot.conf"
    out = subprocess.run(["fail2ban-regex", "--print-all-matched", pop.maillog, str(filt)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = out.stdout
    assert re.search(r"Lines: \d+ lines, 0 ignored, 1 matched, \d+ missed", report), report
    matched = report.split("Matched line(s):")[1].split("`-")[0]
    assert "pymta/pop3d[" in matched and "Aborted login (auth failed" in matched



def test_fetchmail_with_stls_finds_the_sizes_it_was_told(pop, tmp_path):
    """fetchmail compares each message with its LIST size and says
    "not the expected length" when they differ."""
    for m in MESSAGES:
        deliver(pop, m)
    pop.start()
    out_dir = tmp_path / "fetched"
    out_dir.mkdir()
    rc = tmp_path / "fetchmailrc"
    rc.write_text(textwrap.dedent(f"""\
        set no syslog
        poll mx.test.example via 127.0.0.1 protocol pop3 port {pop.ports["pop3"]} uidl
          user "{USER}" password "{PASSWORD}" is "nobody" here
          sslproto 'TLS1.2+' sslcertck sslcertfile "{pop.etc}/tls/cert.pem"
          sslcommonname "mx.test.example"
          mda "/bin/sh -c 'cat > {out_dir}/$$.msg'"
          fetchall nokeep
        """))
    rc.chmod(0o600)
    env = {"HOME": str(tmp_path), "FETCHMAILHOME": str(tmp_path)}
    p = run(["fetchmail", "-v", "-f", str(rc), "--idfile", str(tmp_path / "ids")], env=env,
            check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    report = p.stdout + p.stderr
    assert "not the expected length" not in report
    assert "STLS" in report
    got = sorted(f.read_bytes() for f in out_dir.iterdir())
    assert len(got) == 3
    for m in MESSAGES:
        assert any(m.rstrip(b"\n") in g.replace(b"\r\n", b"\n") for g in got)
    assert files(pop) == {"new": [], "cur": []}


# ------------------------------------------------------------------ the maildrop alone

def test_maildrop_lock_sizes_cache_and_uidl(tmp_path):
    from pymta.services.pop3d import Maildrop, MaildropInUse, SIZES_NAME, uidl_of
    box = str(tmp_path / "box")
    for m in MESSAGES:
        maildir.deliver(box, m)
    first = Maildrop(box)
    first.open()
    assert first.sizes == [len(m) + m.count(b"\n") + (0 if m.endswith(b"\n") else 2)
                           for m in MESSAGES]
    with pytest.raises(MaildropInUse):
        Maildrop(box).open()
    first.close()
    cache = os.path.join(box, SIZES_NAME)
    with open(cache) as f:
        text = f.read()
    # A cache cut short (crash) or with a size no message can have is rebuilt.
    lines = text.split("\n")
    base, size, _ = lines[1].split(" ")
    lines[1] = f"{base} {size} {3 * int(size) + 3}"
    for broken in (text[:-9], "\n".join(lines), "garbage\n"):
        assert broken != text
        with open(cache, "w") as f:
            f.write(broken)
        again = Maildrop(box)
        again.open()
        again.close()
        assert again.sizes == first.sizes
        with open(cache) as f:
            assert f.read() == text
    assert uidl_of("a" * 70) == "a" * 70
    long_name = uidl_of("a" * 71)
    assert long_name.startswith("H") and len(long_name) == 41 and long_name == uidl_of("a" * 71)
    assert uidl_of("1.M2P3.h\u00f6st,S=4").startswith("H")
