"""postconf, the installed console script, against hand-written config dirs."""

import os
import stat
import subprocess

import pytest

from pymta.core.params import PARAMS
from tests.conftest import BIN, ROOT, run

POSTCONF = os.path.join(BIN, "postconf")

MAIN_CF = """\
# pymta test configuration
myhostname = mx.test.example
mydomain = test.example

# trusted networks
mynetworks = 127.0.0.0/8,
    [::1]/128
my_relays = 10.1.0.0/16
smtpd_client_event_limit_exceptions = $mynetworks, $my_relays
message_size_limit = 20480000
"""

MASTER_CF = """\
# service      type  private unpriv  chroot  wakeup  maxproc command + args
127.0.0.1:2525 inet  n       -       n       -       -       smtpd
127.0.0.1:2587 inet  n       -       n       -       -       submission
  -o syslog_name=pymta/submission
  -o smtpd_tls_security_level=encrypt
  -o smtpd_banner=$myhostname
pickup         unix  n       -       n       60      1       pickup
qmgr           unix  n       -       n       300     1       qmgr
"""


@pytest.fixture
def etc(tmp_path):
    d = tmp_path / "etc"
    d.mkdir()
    (d / "main.cf").write_text(MAIN_CF)
    (d / "master.cf").write_text(MASTER_CF)
    return d


def postconf(etc, *args, check=True, env=None):
    return run([POSTCONF, "-c", str(etc), *args], check=check, env=env)


def fails(etc, *args):
    """Run postconf expecting exit status 1 and nothing on stdout; return stderr."""
    p = postconf(etc, *args, check=False)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert p.stdout == ""
    return p.stderr


# --- main.cf display -----------------------------------------------------------------


def test_n_prints_main_cf_settings_sorted(etc):
    assert postconf(etc, "-n").stdout == (
        "message_size_limit = 20480000\n"
        "my_relays = 10.1.0.0/16\n"
        "mydomain = test.example\n"
        "myhostname = mx.test.example\n"
        "mynetworks = 127.0.0.0/8, [::1]/128\n"
        "smtpd_client_event_limit_exceptions = $mynetworks, $my_relays\n")


def test_all_parameters(etc):
    p = postconf(etc)
    lines = p.stdout.splitlines()
    names = [line.split(" =")[0] for line in lines]
    assert names == sorted(set(PARAMS) | {"my_relays"})
    assert "relayhost =" in lines
    assert "myorigin = $myhostname" in lines
    assert f"config_directory = {etc}" in lines
    assert f"queue_directory = $instance_directory/spool" in lines
    assert p.stderr == ""


def test_named_parameters_in_the_order_given(etc):
    assert postconf(etc, "relayhost", "myhostname", "myorigin").stdout == (
        "relayhost =\nmyhostname = mx.test.example\nmyorigin = $myhostname\n")


def test_h_values_only(etc):
    assert postconf(etc, "-h", "myhostname", "relayhost", "mynetworks").stdout == (
        "mx.test.example\n\n127.0.0.0/8, [::1]/128\n")


def test_x_expands(etc):
    assert postconf(etc, "-x", "myorigin", "mydestination", "smtpd_client_event_limit_exceptions",
                    "queue_directory").stdout == (
        "myorigin = mx.test.example\n"
        "mydestination = mx.test.example, localhost.test.example, localhost\n"
        "smtpd_client_event_limit_exceptions = 127.0.0.0/8, [::1]/128, 10.1.0.0/16\n"
        f"queue_directory = {etc.parent}/spool\n")


def test_d_prints_defaults(etc):
    assert postconf(etc, "-d", "myhostname", "message_size_limit", "myorigin").stdout == (
        "myhostname = localhost\nmessage_size_limit = 10240000\nmyorigin = $myhostname\n")
    assert postconf(etc, "-dx", "myorigin").stdout == "myorigin = localhost\n"
    names = [line.split(" =")[0] for line in postconf(etc, "-d").stdout.splitlines()]
    assert names == sorted(PARAMS)


def test_d_works_without_main_cf(tmp_path):
    assert postconf(tmp_path, "-d", "mail_owner").stdout == "mail_owner = pymta\n"


def test_n_with_names_prints_only_set_ones(etc):
    assert postconf(etc, "-n", "relayhost", "myhostname").stdout == "myhostname = mx.test.example\n"


def test_o_overrides_for_this_run(etc):
    p = postconf(etc, "-x", "-o", "myhostname=other.example", "-o", "relayhost=[$myhostname]:587",
                 "myorigin", "relayhost")
    assert p.stdout == "myorigin = other.example\nrelayhost = [other.example]:587\n"
    assert "myhostname = mx.test.example\n" in (etc / "main.cf").read_text()


def test_unknown_names_warn_and_exit_zero(etc):
    p = postconf(etc, "nosuch", "myhostname", "myhostnmae")
    assert p.returncode == 0
    assert p.stdout == "myhostname = mx.test.example\n"
    assert p.stderr == ("postconf: warning: nosuch: unknown parameter\n"
                        "postconf: warning: myhostnmae: unknown parameter\n")


def test_f_folds_long_values(etc):
    restrictions = ", ".join(["permit_mynetworks", "permit_sasl_authenticated",
                              "reject_unauth_destination", "reject_unknown_recipient_domain",
                              "reject_unlisted_recipient"])
    p = postconf(etc, "-f", "-o", f"smtpd_recipient_restrictions={restrictions}",
                 "smtpd_recipient_restrictions")
    assert p.stdout == (
        "smtpd_recipient_restrictions = permit_mynetworks, permit_sasl_authenticated,\n"
        "    reject_unauth_destination, reject_unknown_recipient_domain,\n"
        "    reject_unlisted_recipient\n")


def test_mail_config_environment(etc):
    p = run([POSTCONF, "-h", "myhostname"], env={"MAIL_CONFIG": str(etc)})
    assert p.stdout == "mx.test.example\n"


def test_missing_master_cf_is_a_warning_for_main_cf(etc):
    (etc / "master.cf").unlink()
    p = postconf(etc, "-h", "myhostname")
    assert p.stdout == "mx.test.example\n"
    assert p.stderr == f"postconf: warning: {etc}/master.cf: file not found\n"
    assert fails(etc, "-M") == f"postconf: fatal: {etc}/master.cf: file not found\n"


def test_missing_main_cf(tmp_path):
    assert fails(tmp_path, "-n") == f"postconf: fatal: {tmp_path}/main.cf: file not found\n"


def test_conflicting_options(etc):
    assert fails(etc, "-d", "-n") == "postconf: fatal: specify one of -d -n\n"
    assert fails(etc, "-e", "-M") == "postconf: fatal: specify one of -e -M\n"
    assert fails(etc, "-n", "relayhost=x") == "postconf: fatal: specify one of -e -n\n"
    assert fails(etc, "--bogus").startswith("postconf: fatal: usage: ")


# --- main.cf editing -------------------------------------------------------------------


def test_e_replaces_in_place_and_appends(etc):
    os.chmod(etc / "main.cf", 0o640)
    p = postconf(etc, "-e", "mynetworks = 127.0.0.0/8", "relayhost=[smtp.example.net]:587",
                 "myhostname=mail.test.example")
    assert (p.stdout, p.stderr) == ("", "")
    assert (etc / "main.cf").read_text() == (
        "# pymta test configuration\n"
        "myhostname = mail.test.example\n"
        "mydomain = test.example\n"
        "\n"
        "# trusted networks\n"
        "mynetworks = 127.0.0.0/8\n"
        "my_relays = 10.1.0.0/16\n"
        "smtpd_client_event_limit_exceptions = $mynetworks, $my_relays\n"
        "message_size_limit = 20480000\n"
        "relayhost = [smtp.example.net]:587\n")
    assert stat.S_IMODE(os.stat(etc / "main.cf").st_mode) == 0o640
    assert sorted(os.listdir(etc)) == ["main.cf", "master.cf"]
    assert postconf(etc, "-h", "relayhost").stdout == "[smtp.example.net]:587\n"


def test_e_is_implied_by_name_value(etc):
    postconf(etc, "relayhost=[relay.test]", "message_size_limit=0")
    text = (etc / "main.cf").read_text()
    assert text.endswith("message_size_limit = 0\nrelayhost = [relay.test]\n")
    assert text.count("message_size_limit") == 1


def test_e_keeps_a_comment_inside_a_replaced_setting(etc):
    (etc / "main.cf").write_text("mynetworks = 127.0.0.0/8,\n# the office\n  10.0.0.0/8\nmydomain = x\n")
    postconf(etc, "-e", "mynetworks=[::1]/128")
    assert (etc / "main.cf").read_text() == "mynetworks = [::1]/128\n# the office\nmydomain = x\n"


def test_e_adds_a_newline_to_an_unterminated_file(etc):
    (etc / "main.cf").write_text("myhostname = a.test")
    postconf(etc, "-e", "mydomain=test")
    assert (etc / "main.cf").read_text() == "myhostname = a.test\nmydomain = test\n"


def test_e_refuses_a_result_that_does_not_validate(etc):
    before = (etc / "main.cf").read_text()
    assert fails(etc, "-e", "message_size_limit=lots") == (
        f"postconf: fatal: {etc}/main.cf:10: message_size_limit: bad size value 'lots' "
        f"({etc}/main.cf not changed)\n")
    assert fails(etc, "-e", "myhostnmae=x") == (
        f"postconf: fatal: {etc}/main.cf:11: unknown parameter 'myhostnmae' ({etc}/main.cf not changed)\n")
    assert fails(etc, "-e", "smtpd_banner=${myhostname") == (
        f"postconf: fatal: {etc}/main.cf:11: smtpd_banner: unbalanced '{{' in '${{myhostname' "
        f"({etc}/main.cf not changed)\n")
    assert (etc / "main.cf").read_text() == before
    assert sorted(os.listdir(etc)) == ["main.cf", "master.cf"]


def test_e_refuses_multi_line_values_and_bad_names(etc):
    before = (etc / "main.cf").read_text()
    assert fails(etc, "-e", "relayhost=x\nmyhostname=evil") == (
        "postconf: fatal: -e relayhost: the value must be one line\n")
    assert fails(etc, "-e", "my hostname=x") == "postconf: fatal: -e my hostname=x: use -e name=value\n"
    assert fails(etc, "-e", "relayhost") == "postconf: fatal: -e relayhost: use -e name=value\n"
    assert (etc / "main.cf").read_text() == before


def test_concurrent_edits_all_land(etc):
    # Without the lock about half of these edits are lost (read, read,
    # rename, rename); 24 processes make that show every time.
    names = sorted(name for name, param in PARAMS.items() if param.type == "time")[:24]
    assert len(names) == 24
    procs = [subprocess.Popen([POSTCONF, "-c", str(etc), "-e", f"{name}={i + 1}s"])
             for i, name in enumerate(names)]
    assert [p.wait(timeout=60) for p in procs] == [0] * len(names)
    out = postconf(etc, "-n", *names).stdout
    assert out == "".join(f"{name} = {i + 1}s\n" for i, name in enumerate(names))


def test_X_removes_settings_with_their_continuation_lines(etc):
    postconf(etc, "-X", "mynetworks", "message_size_limit", "relayhost")
    assert (etc / "main.cf").read_text() == (
        "# pymta test configuration\n"
        "myhostname = mx.test.example\n"
        "mydomain = test.example\n"
        "\n"
        "# trusted networks\n"
        "my_relays = 10.1.0.0/16\n"
        "smtpd_client_event_limit_exceptions = $mynetworks, $my_relays\n")
    assert postconf(etc, "-h", "message_size_limit").stdout == "10240000\n"


def test_X_refuses_to_leave_a_dangling_reference(etc):
    assert fails(etc, "-X", "my_relays") == (
        f"postconf: fatal: {etc}/main.cf:8: smtpd_client_event_limit_exceptions: "
        f"reference to undefined parameter $my_relays ({etc}/main.cf not changed)\n")


# --- master.cf display -----------------------------------------------------------------


def test_M_prints_services(etc):
    assert postconf(etc, "-M").stdout == (
        "127.0.0.1:2525 inet n    -       n       -       -       smtpd\n"
        "127.0.0.1:2587 inet n    -       n       -       -       submission -o syslog_name=pymta/submission"
        " -o smtpd_tls_security_level=encrypt -o smtpd_banner=$myhostname\n"
        "pickup     unix  n       -       n       60      1       pickup\n"
        "qmgr       unix  n       -       n       300     1       qmgr\n")


def test_M_selects_and_folds(etc):
    assert postconf(etc, "-Mf", "127.0.0.1:2587/inet").stdout == (
        "127.0.0.1:2587 inet n    -       n       -       -       submission\n"
        "    -o syslog_name=pymta/submission\n"
        "    -o smtpd_tls_security_level=encrypt\n"
        "    -o smtpd_banner=$myhostname\n")
    assert postconf(etc, "-M", "*/unix").stdout == (
        "pickup     unix  n       -       n       60      1       pickup\n"
        "qmgr       unix  n       -       n       300     1       qmgr\n")
    p = postconf(etc, "-M", "qmgr", "smtp/inet")
    assert p.stdout == "qmgr       unix  n       -       n       300     1       qmgr\n"
    assert p.stderr == 'postconf: warning: unmatched request: "smtp/inet"\n'
    assert fails(etc, "-M", "a/b/c") == "postconf: fatal: -M option requires service_name[/type]\n"


def test_M_x_expands_o_values(etc):
    out = postconf(etc, "-Mx", "127.0.0.1:2587").stdout
    assert out.endswith(" -o smtpd_banner=mx.test.example\n")


def test_P_prints_o_settings(etc):
    assert postconf(etc, "-P").stdout == (
        "127.0.0.1:2587/inet/smtpd_banner = $myhostname\n"
        "127.0.0.1:2587/inet/smtpd_tls_security_level = encrypt\n"
        "127.0.0.1:2587/inet/syslog_name = pymta/submission\n")
    assert postconf(etc, "-Px", "*/*/smtpd_banner").stdout == (
        "127.0.0.1:2587/inet/smtpd_banner = mx.test.example\n")
    assert postconf(etc, "-Ph", "127.0.0.1:2587/inet/syslog_name").stdout == "pymta/submission\n"
    p = postconf(etc, "-P", "pickup")
    assert (p.stdout, p.stderr) == ("", 'postconf: warning: unmatched request: "pickup"\n')


# --- configuration mistakes: FILE:LINE: reason, exit 1 -------------------------------------

MISTAKES = [
    ("master.cf", 7, "pickup         fifo  n       -       n       60      1       pickup",
     "unknown service type 'fifo' (supported: inet, unix)"),
    ("master.cf", 8, "qmgr           unix  n       -       n       300     many    qmgr",
     "bad maximal process count 'many': use -, 0 or a positive number"),
    ("master.cf", 2, "127.0.0.1:70000 inet n       -       n       -       -       smtpd",
     "bad port '70000' in inet service '127.0.0.1:70000': must be 1-65535"),
    ("master.cf", 2, "127.0.0.1:0 inet  n       -       n       -       -       smtpd",
     "bad port '0' in inet service '127.0.0.1:0': must be 1-65535"),
    ("main.cf", 2, "myhostname = ${mydomain",
     "myhostname: unbalanced '{' in '${mydomain'"),
    ("main.cf", 3, "mydomian = test.example",
     "unknown parameter 'mydomian'"),
]


def broken(etc, name, line, text):
    original = MAIN_CF if name == "main.cf" else MASTER_CF
    lines = original.splitlines()
    lines[line - 1] = text
    (etc / name).write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("name, line, text, reason", MISTAKES,
                         ids=["unknown-service-type", "bad-maxproc", "bad-port", "port-zero",
                              "unbalanced-brace", "unknown-parameter"])
@pytest.mark.parametrize("args", [(), ("-n",), ("-M",), ("-P",), ("myhostname",)],
                         ids=["all", "n", "M", "P", "named"])
def test_configuration_mistakes(etc, name, line, text, reason, args):
    broken(etc, name, line, text)
    assert fails(etc, *args) == f"postconf: fatal: {etc}/{name}:{line}: {reason}\n"


def test_mistyped_o_value_names_its_master_cf_line(etc):
    (etc / "master.cf").write_text(MASTER_CF.replace("-o syslog_name=pymta/submission",
                                                     "-o smtpd_timeout=soon"))
    assert fails(etc, "-M") == (
        f"postconf: fatal: {etc}/master.cf:3: smtpd_timeout: bad time value 'soon': "
        "use a number with an optional unit s, m, h, d or w\n")


def test_bad_override_on_the_command_line(etc):
    assert fails(etc, "-o", "nosuch=1") == "postconf: fatal: -o: unknown parameter 'nosuch'\n"
    assert fails(etc, "-o", "nosuch") == "postconf: fatal: -o nosuch: use -o name=value\n"


# --- generated documentation ------------------------------------------------------------


def test_doc_markdown_is_docs_parameters_md(etc):
    with open(os.path.join(ROOT, "docs", "parameters.md"), encoding="utf-8") as f:
        assert run([POSTCONF, "--doc-markdown"]).stdout == f.read()
