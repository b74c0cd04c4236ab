"""Submission (2587, STARTTLS then AUTH) and submissions (2465, implicit
TLS) with real clients: msmtp, swaks, smtplib; failed-login throttling,
sender ownership, fail2ban's postfix filter, certificate reload."""

import base64
import hashlib
import os
import pwd
import re
import shutil
import smtplib
import socket
import ssl

import pytest

from tests.conftest import run, wait_for
from tests.system.test_smtpd import (
    HOST, PASSWORD, S221_BYE, S250_MAIL_OK, S250_RCPT_OK, Raw, add_user, delivered,
)

S235_OK = "235 2.7.0 Authentication successful\r\n"
S530_TLS_FIRST = "530 5.7.0 Must issue a STARTTLS command first\r\n"
S530_AUTH_REQUIRED = "530 5.7.0 Authentication required\r\n"
S535_PLAIN = "535 5.7.8 Error: authentication failed: authentication failure\r\n"
S454_REFUSED = "454 4.7.0 Too many failed authentications, try again later\r\n"
SUB_LOG = r"\w{3} [ \d]\d \d\d:\d\d:\d\d mx\.test\.example pymta/submission/smtpd\[\d+\]: "
F2B_STOCK = "/etc/fail2ban/filter.d"
FILTER = os.path.join(os.path.dirname(__file__), "..", "..", "etc", "fail2ban", "filter.d",
                      "pymta-postfix-sasl.conf")


def plain(user, password):
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


@pytest.fixture
def sub(instance):
    add_user(instance, "alice@test.example")
    add_user(instance, "bob@test.example", "bob-secret-2")
    instance.start()
    return instance


def tls_session(inst, port_name="submission"):
    """A raw session on submission after EHLO, STARTTLS and EHLO again."""
    c = Raw(inst.ports[port_name])
    assert c.reply().startswith("220 ")
    ehlo = c.cmd("EHLO client.example")
    assert "250-STARTTLS" in ehlo and "AUTH" not in ehlo
    c.starttls()
    ehlo = c.cmd("EHLO client.example")
    assert "250-AUTH PLAIN LOGIN\r\n" in ehlo
    return c


def msmtp(inst, tmp_path, recipient, message, user="alice@test.example", password=PASSWORD,
          sender="alice@test.example"):
    rc = tmp_path / "msmtprc"
    logfile = tmp_path / "msmtp.log"
    rc.write_text(f"""account sub
host 127.0.0.1
port {inst.ports["submission"]}
tls on
tls_starttls on
tls_certcheck off
auth plain
user {user}
password {password}
from {sender}
logfile {logfile}
""")
    rc.chmod(0o600)
    p = run(["msmtp", "-C", str(rc), "-a", "sub", recipient], input=message, check=False)
    log = logfile.read_text() if logfile.exists() else ""
    return p, log


# ---------------------------------------------------------------- msmtp, swaks

def test_msmtp_starttls_auth_plain_to_local_user(sub, tmp_path):
    p, log = msmtp(sub, tmp_path, "bob@test.example",
                   "From: alice@test.example\nTo: bob@test.example\nSubject: via msmtp\n\nhello bob\n")
    assert p.returncode == 0, p.stderr
    qid = re.search(r"queued as (\w+)", log).group(1)
    msg = delivered(sub, user="bob")[0]
    assert b"hello bob" in msg
    assert re.search(rb"\(using TLSv1\.3 with cipher \S+ \(\d+/\d+ bits\)\)\n"
                     rb"\tby mx\.test\.example \(pymta\) with ESMTPSA id " + qid.encode(), msg)
    assert re.search(SUB_LOG + qid + r": client=localhost\[127\.0\.0\.1\], sasl_method=PLAIN, "
                     r"sasl_username=alice@test\.example$", sub.log(), re.M)
    assert PASSWORD not in sub.log()


def test_msmtp_to_remote_domain_is_queued_for_smtp(sub, tmp_path):
    p, log = msmtp(sub, tmp_path, "carol@remote.example",
                   "From: alice@test.example\nSubject: out\n\nto the world\n")
    assert p.returncode == 0, p.stderr
    qid = re.search(r"queued as (\w+)", log).group(1)
    sub.wait_log(f"{qid}: from=<alice@test.example>")
    sub.wait_log(f"{qid}: to=<carol@remote.example>")
    assert f"{qid}: to=<carol@remote.example>, relay=local" not in sub.log()
    assert not os.path.exists(sub.path("mail", "remote.example"))


def test_swaks_auth_login_on_implicit_tls(sub):
    p = run(["swaks", "--timeout", "30", "--server", f"127.0.0.1:{sub.ports['submissions']}",
             "--tlsc", "--auth", "LOGIN", "--auth-user", "alice@test.example",
             "--auth-password", PASSWORD, "--from", "alice@test.example",
             "--to", "bob@test.example"])
    assert "<~  235 2.7.0 Authentication successful" in p.stdout
    assert re.search(r"<~  250 2\.0\.0 Ok: queued as \w+", p.stdout)
    msg = delivered(sub, user="bob")[0]
    assert b"with ESMTPSA id" in msg
    sub.wait_log("pymta/smtps/smtpd[")
    assert re.search(r"pymta/smtps/smtpd\[\d+\]: \w+: client=localhost\[127\.0\.0\.1\], "
                     r"sasl_method=LOGIN, sasl_username=alice@test\.example", sub.log())


def test_missing_message_id_and_date_are_added(sub):
    s = smtplib.SMTP("127.0.0.1", sub.ports["submission"], timeout=15)
    try:
        s.starttls(context=_insecure())
        s.login("alice@test.example", PASSWORD)
        s.sendmail("alice@test.example", ["bob@test.example"],
                   b"From: alice@test.example\r\nSubject: bare\r\n\r\nno date, no id\r\n")
    finally:
        s.quit()
    msg = delivered(sub, user="bob")[0]
    assert re.search(rb"\nDate: \w{3}, [ \d]?\d \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}", msg)
    assert re.search(rb"\nMessage-Id: <[^>]+@mx\.test\.example>\n", msg, re.I)


# ---------------------------------------------------------------- what submission refuses

def test_auth_before_starttls_is_refused(sub):
    c = Raw(sub.ports["submission"])
    c.reply()
    assert "AUTH" not in c.cmd("EHLO client.example")
    assert c.cmd(f"AUTH PLAIN {plain('alice@test.example', PASSWORD)}") == S530_TLS_FIRST
    assert c.cmd("MAIL FROM:<alice@test.example>") == S530_TLS_FIRST
    assert c.cmd("QUIT") == S221_BYE


def test_no_auth_at_all_is_refused(sub):
    c = tls_session(sub)
    assert c.cmd("MAIL FROM:<alice@test.example>") == S530_AUTH_REQUIRED
    assert c.cmd("RCPT TO:<carol@remote.example>") == "503 5.5.1 Error: need MAIL command\r\n"
    assert c.cmd("QUIT") == S221_BYE


def test_port_25_offers_no_auth(sub):
    c = Raw(sub.ports["smtp"])
    c.reply()
    c.cmd("EHLO client.example")
    c.starttls()
    assert "AUTH" not in c.cmd("EHLO client.example")
    assert c.cmd(f"AUTH PLAIN {plain('alice@test.example', PASSWORD)}") == (
        "503 5.5.1 Error: authentication not enabled\r\n")
    c.cmd("QUIT")


def test_wrong_password_then_refused_for_a_while(instance):
    add_user(instance, "alice@test.example")
    instance.postconf_e(auth_failure_limit="2", auth_failure_penalty_time="60s")
    instance.start()
    c = tls_session(instance)
    assert c.cmd(f"AUTH PLAIN {plain('alice@test.example', 'wrong-password-1')}") == S535_PLAIN
    assert c.cmd("AUTH LOGIN") == "334 VXNlcm5hbWU6\r\n"
    assert c.cmd(base64.b64encode(b"alice@test.example").decode()) == "334 UGFzc3dvcmQ6\r\n"
    assert c.cmd(base64.b64encode(b"wrong-password-2").decode()) == (
        "535 5.7.8 Error: authentication failed: UGFzc3dvcmQ6\r\n")
    # Refused now, even with the right password, on a new connection too.
    assert c.cmd(f"AUTH PLAIN {plain('alice@test.example', PASSWORD)}") == S454_REFUSED
    c.cmd("QUIT")
    c = tls_session(instance)
    assert c.cmd(f"AUTH PLAIN {plain('alice@test.example', PASSWORD)}") == S454_REFUSED
    c.cmd("QUIT")
    log = instance.log()
    assert re.search(SUB_LOG + r"warning: localhost\[127\.0\.0\.1\]: SASL PLAIN authentication "
                     r"failed: authentication failure$", log, re.M)
    assert re.search(SUB_LOG + r"warning: localhost\[127\.0\.0\.1\]: SASL LOGIN authentication "
                     r"failed: UGFzc3dvcmQ6$", log, re.M)
    assert "wrong-password" not in log and PASSWORD not in log
    assert base64.b64encode(b"wrong-password-2").decode() not in log


def test_unknown_user_gets_the_same_answer(sub):
    c = tls_session(sub)
    assert c.cmd(f"AUTH PLAIN {plain('nobody@test.example', PASSWORD)}") == S535_PLAIN
    c.cmd("QUIT")


def test_sending_as_another_users_address(sub):
    c = tls_session(sub)
    assert c.cmd(f"AUTH PLAIN {plain('alice@test.example', PASSWORD)}") == S235_OK
    assert c.cmd("MAIL FROM:<bob@test.example>") == S250_MAIL_OK
    assert c.cmd("RCPT TO:<carol@remote.example>") == (
        "553 5.7.1 <bob@test.example>: Sender address rejected: not owned by user "
        "alice@test.example\r\n")
    c.cmd("RSET")
    assert c.cmd("MAIL FROM:<Alice@Test.Example>") == S250_MAIL_OK
    assert c.cmd("RCPT TO:<carol@remote.example>") == S250_RCPT_OK
    c.cmd("QUIT")
    sub.wait_log("NOQUEUE: reject: RCPT from localhost[127.0.0.1]: 553 5.7.1 <bob@test.example>: "
                 "Sender address rejected: not owned by user alice@test.example; "
                 "from=<bob@test.example> to=<carol@remote.example> proto=ESMTP "
                 "helo=<client.example>")


def test_sending_as_an_alias(instance):
    add_user(instance, "alice@test.example")
    with open(os.path.join(instance.etc, "virtual"), "w") as f:
        f.write("sales@test.example alice@test.example\n")
    instance.postconf_e(virtual_alias_maps="texthash:$config_directory/virtual")
    instance.start()
    c = tls_session(instance)
    assert c.cmd(f"AUTH PLAIN {plain('alice@test.example', PASSWORD)}") == S235_OK
    assert c.cmd("MAIL FROM:<sales@test.example>") == S250_MAIL_OK
    assert c.cmd("RCPT TO:<carol@remote.example>") == S250_RCPT_OK
    c.cmd("QUIT")


# ---------------------------------------------------------------- fail2ban

def test_fail2ban_postfix_filter_matches_failed_logins(sub, tmp_path):
    for port_name, mech in (("submission", "PLAIN"), ("submissions", "LOGIN")):
        args = ["swaks", "--timeout", "30", "--server", f"127.0.0.1:{sub.ports[port_name]}",
                "--auth", mech, "--auth-user", "alice@test.example", "--auth-password", "nope",
                "--from", "alice@test.example", "--to", "bob@test.example"]
        args.insert(1, "--tlsc" if port_name == "submissions" else "--tls")
        p = run(args, check=False)
        assert "535 5.7.8 Error: authentication failed" in p.stdout
    sub.wait_log("SASL LOGIN authentication failed")
    filters = tmp_path / "filter.d"
    filters.mkdir()
    for name in ("common.conf", "postfix.conf"):
        shutil.copy(os.path.join(F2B_STOCK, name), filters)
    shutil.copy(FILTER, filters)
    p = run(["fail2ban-regex", sub.maillog, str(filters / "pymta-postfix-sasl.conf")])
    assert re.search(r"^Failregex: 2 total$", p.stdout, re.M), p.stdout
    assert re.search(r"#\) \[# of hits\] regular expression\n\|\s+1\) \[2\]", p.stdout), p.stdout
    assert "127.0.0.1" in run(["fail2ban-regex", "--print-all-matched", sub.maillog,
                               str(filters / "pymta-postfix-sasl.conf")]).stdout
    # The stock filter alone does not know pymta's daemon names.
    stock = run(["fail2ban-regex", sub.maillog, "postfix[mode=auth]"])
    assert re.search(r"^Failregex: 0 total$", stock.stdout, re.M)


# ---------------------------------------------------------------- certificates

def _insecure():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def served_cert(port):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        with _insecure().wrap_socket(s, server_hostname=HOST) as t:
            return hashlib.sha256(t.getpeercert(binary_form=True)).hexdigest()


def starttls_cert(port):
    c = Raw(port)
    c.reply()
    c.cmd("EHLO client.example")
    c.starttls()
    der = c.sock.getpeercert(binary_form=True)
    c.cmd("QUIT")
    return hashlib.sha256(der).hexdigest()


def test_replaced_certificate_is_served_after_reload(sub):
    from pymta.core.tls import make_self_signed
    old_implicit = served_cert(sub.ports["submissions"])
    old_starttls = starttls_cert(sub.ports["submission"])
    assert old_implicit == old_starttls
    cert = os.path.join(sub.etc, "tls", "cert.pem")
    key = os.path.join(sub.etc, "tls", "key.pem")
    make_self_signed("new.test.example", cert, key, overwrite=True)
    owner = pwd.getpwnam("pymta")
    os.chown(key, owner.pw_uid, owner.pw_gid)
    sub.pymta("reload")
    new = wait_for(lambda: (lambda h: h if h != old_implicit else None)(
        served_cert(sub.ports["submissions"])), 30, what="new certificate on submissions")
    with open(cert, "rb") as f:
        expected = hashlib.sha256(ssl.PEM_cert_to_DER_cert(f.read().decode())).hexdigest()
    assert new == expected
    assert wait_for(lambda: starttls_cert(sub.ports["submission"]) == expected, 30,
                    what="new certificate on submission")


# ---------------------------------------------------------------- libexec/submission

def test_submission_program_has_the_submission_defaults(instance):
    add_user(instance, "alice@test.example")
    port = instance.ports["submission"]
    path = os.path.join(instance.etc, "master.cf")
    with open(path) as f:
        text = f.read()
    text = re.sub(rf"(?m)^127\.0\.0\.1:{port} .*\n(?:[ \t]+.*\n)*",
                  f"127.0.0.1:{port} inet n - n - - submission\n", text)
    instance.write_master_cf(text)
    instance.start()
    c = Raw(port)
    c.reply()
    c.cmd("EHLO client.example")
    assert c.cmd("MAIL FROM:<alice@test.example>") == S530_TLS_FIRST
    c.starttls()
    assert "250-AUTH PLAIN LOGIN\r\n" in c.cmd("EHLO client.example")
    assert c.cmd("MAIL FROM:<alice@test.example>") == S530_AUTH_REQUIRED
    assert c.cmd(f"AUTH PLAIN {plain('alice@test.example', PASSWORD)}") == S235_OK
    assert c.cmd("MAIL FROM:<bob@test.example>") == S250_MAIL_OK
    assert c.cmd("RCPT TO:<carol@remote.example>").startswith("553 5.7.1 <bob@test.example>")
    c.cmd("QUIT")
    instance.wait_log("pymta/submission/smtpd[")


def test_tls_older_than_1_2_is_refused(sub):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = _insecure()
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with socket.create_connection(("127.0.0.1", sub.ports["submissions"]), timeout=10) as s:
        with pytest.raises(ssl.SSLError):
            ctx.wrap_socket(s, server_hostname=HOST)
    with socket.create_connection(("127.0.0.1", sub.ports["submissions"]), timeout=10) as s:
        with _insecure().wrap_socket(s, server_hostname=HOST) as t:
            assert t.version() in ("TLSv1.2", "TLSv1.3")
