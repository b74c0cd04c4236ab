"""Tests for pymta.core.config: main.cf and master.cf in Postfix syntax."""

import os

import pytest

from pymta.core import config
from pymta.core.errors import ConfigError


def write(directory, name, text):
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def load_main(tmp_path, text, **kw):
    write(tmp_path, "main.cf", text)
    return config.load(str(tmp_path), **kw)


def main_error(tmp_path, text):
    """The ConfigError that loading `text` as main.cf raises."""
    path = write(tmp_path, "main.cf", text)
    with pytest.raises(ConfigError) as info:
        config.load(str(tmp_path))
    assert info.value.file == path
    return info.value


def master_entries(tmp_path, text):
    write(tmp_path, "master.cf", text)
    return config.load_master(str(tmp_path))


def master_error(tmp_path, text):
    path = write(tmp_path, "master.cf", text)
    with pytest.raises(ConfigError) as info:
        config.load_master(str(tmp_path))
    assert info.value.file == path
    return info.value


# --- main.cf: syntax ---------------------------------------------------------------


def test_settings_comments_and_blank_lines(tmp_path):
    cfg = load_main(tmp_path, "# a comment\n\nmyhostname = mx.example.org\n"
                              "   # indented comment\nmydomain=example.org\n\t\n")
    assert cfg.myhostname == "mx.example.org"
    assert cfg["mydomain"] == "example.org"
    assert cfg.where("myhostname") == (str(tmp_path / "main.cf"), 3)
    assert cfg.where("mydomain") == (str(tmp_path / "main.cf"), 5)
    assert cfg.where("relayhost") == (None, None)


def test_value_keeps_inner_spaces_and_equals_signs(tmp_path):
    cfg = load_main(tmp_path, "smtpd_banner =   $myhostname   ESMTP a=b  \n")
    assert cfg.raw("smtpd_banner") == "$myhostname   ESMTP a=b"
    assert cfg.smtpd_banner == "localhost   ESMTP a=b"


def test_empty_value(tmp_path):
    cfg = load_main(tmp_path, "relayhost =\n")
    assert cfg.relayhost == ""
    assert "relayhost" in cfg.explicit


def test_continuation_lines_join_with_one_space(tmp_path):
    cfg = load_main(tmp_path, "mydestination = a,\n    b,\n\tc\nmyhostname = h\n")
    assert cfg.raw("mydestination") == "a, b, c"
    assert cfg.mydestination == ["a", "b", "c"]
    assert cfg.where("mydestination")[1] == 1
    assert cfg.where("myhostname")[1] == 4


def test_comment_and_blank_lines_do_not_end_a_logical_line(tmp_path):
    cfg = load_main(tmp_path, "mynetworks = 127.0.0.0/8\n# comment\n\n  10.0.0.0/8\n")
    assert cfg.mynetworks == ["127.0.0.0/8", "10.0.0.0/8"]


def test_crlf_line_ends(tmp_path):
    cfg = load_main(tmp_path, "myhostname = a.example\r\nmydomain = example\r\n")
    assert cfg.myhostname == "a.example"
    assert cfg.mydomain == "example"


def test_form_feed_does_not_shift_line_numbers(tmp_path):
    e = main_error(tmp_path, "smtpd_banner = a\x0cb\nnosuch = 1\n")
    assert e.line == 2


def test_last_setting_wins(tmp_path):
    cfg = load_main(tmp_path, "myhostname = a\nmyhostname = b\n")
    assert cfg.myhostname == "b"
    assert cfg.where("myhostname")[1] == 2


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        config.load(str(tmp_path))
    assert str(info.value) == f"{tmp_path}/main.cf: file not found"


def test_not_utf8(tmp_path):
    (tmp_path / "main.cf").write_bytes(b"myhostname = \xff\n")
    with pytest.raises(ConfigError) as info:
        config.load(str(tmp_path))
    assert str(info.value).startswith(f"{tmp_path}/main.cf: not valid UTF-8")


# --- main.cf: expansion --------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [
    ("$myhostname", "h.example"),
    ("${myhostname}", "h.example"),
    ("$(myhostname)", "h.example"),
    ("<$myhostname>", "<h.example>"),
    ("${myhostname}x", "h.examplex"),
    ("$myhostname.$mydomain", "h.example.example"),
    ("$$myhostname", "$myhostname"),
    ("cost $", "cost $"),
    ("a $ b", "a $ b"),
    ("${myhostname?set}", "set"),
    ("${relayhost?set}", ""),
    ("${myhostname:unset}", "h.example"),
    ("${relayhost:unset}", "unset"),
    ("${relayhost:$mydomain}", "example"),
    ("${myhostname?[$mydomain]}", "[example]"),
    ("$(relayhost:(x))", "(x)"),
    ("${undeclared?x}", ""),
    ("${undeclared:fallback}", "fallback"),
])
def test_expansion_forms(tmp_path, value, expected):
    cfg = load_main(tmp_path, f"myhostname = h.example\nmydomain = example\nrelayhost =\n"
                              f"smtpd_banner = {value}\n")
    assert cfg.smtpd_banner == expected
    assert cfg.raw("smtpd_banner") == value


def test_defaults_refer_to_other_parameters(tmp_path):
    cfg = load_main(tmp_path, "myhostname = mx.example.org\nmydomain = example.org\n")
    assert cfg.myorigin == "mx.example.org"
    assert cfg.mydestination == ["mx.example.org", "localhost.example.org", "localhost"]
    assert cfg.raw("myorigin") == "$myhostname"


def test_instance_paths_follow_the_config_directory(tmp_path):
    etc = tmp_path / "etc"
    etc.mkdir()
    cfg = load_main(etc, "")
    assert cfg.config_directory == str(etc)
    assert cfg.instance_directory == str(tmp_path)
    assert cfg.queue_directory == f"{tmp_path}/spool"
    assert cfg.run_directory == f"{tmp_path}/run"
    assert cfg.virtual_mailbox_base == f"{tmp_path}/mail"
    assert cfg.maillog_file == f"{tmp_path}/log/maillog"
    assert cfg.alias_maps == [f"texthash:{etc}/aliases"]


def test_user_defined_parameter_used_elsewhere(tmp_path):
    cfg = load_main(tmp_path, "my_relays = 10.0.0.0/8\nmynetworks = 127.0.0.0/8, $my_relays\n")
    assert cfg.mynetworks == ["127.0.0.0/8", "10.0.0.0/8"]
    assert cfg["my_relays"] == "10.0.0.0/8"


def test_local_agent_names_stay_for_the_local_agent(tmp_path):
    cfg = load_main(tmp_path, "forward_path = $home/.forward${extension?+}${extension}, $home/.forward\n")
    assert cfg.forward_path == ["$home/.forward${extension?+}$extension", "$home/.forward"]


def test_recursion_is_an_error(tmp_path):
    e = main_error(tmp_path, "myhostname = $mydomain\nmydomain = x.$myhostname\n")
    assert e.line in (1, 2)
    assert "recursive reference to $" in e.reason


def test_self_reference_is_an_error(tmp_path):
    e = main_error(tmp_path, "# x\nmyhostname = a.$myhostname\n")
    assert str(e) == f"{tmp_path}/main.cf:2: myhostname: recursive reference to $myhostname"


def test_recursion_through_a_default(tmp_path):
    # myorigin defaults to $myhostname: this loop runs through a default.
    e = main_error(tmp_path, "myhostname = $myorigin\n")
    assert e.line == 1
    assert "recursive reference" in e.reason


@pytest.mark.parametrize("value, reason", [
    ("${myhostname", "unbalanced '{' in '${myhostname'"),
    ("$(myhostname", "unbalanced '(' in '$(myhostname'"),
    ("x ${relayhost?${mydomain}", "unbalanced '{' in 'x ${relayhost?${mydomain}'"),
    ("${}", "bad parameter reference '${}'"),
    ("${my hostname}", "bad parameter reference '${my hostname}'"),
    ("$nosuch", "reference to undefined parameter $nosuch"),
    ("${nosuch}", "reference to undefined parameter $nosuch"),
])
def test_bad_references(tmp_path, value, reason):
    e = main_error(tmp_path, f"# first\nmydomain = example\nsmtpd_banner = {value}\n")
    assert str(e) == f"{tmp_path}/main.cf:3: smtpd_banner: {reason}"


def test_unbalanced_brace_in_a_continued_value(tmp_path):
    e = main_error(tmp_path, "myhostname = h\nsmtpd_banner = ${myhostname\n  ESMTP\n")
    assert str(e) == f"{tmp_path}/main.cf:2: smtpd_banner: unbalanced '{{' in '${{myhostname ESMTP'"


# --- main.cf: names and types ---------------------------------------------------------


def test_unknown_parameter(tmp_path):
    e = main_error(tmp_path, "myhostname = a\n\nmyhostnmae = b\n")
    assert str(e) == f"{tmp_path}/main.cf:3: unknown parameter 'myhostnmae'"


@pytest.mark.parametrize("text, line, reason", [
    ("myhostname\n", 1, "missing '=' after parameter name 'myhostname'"),
    ("# c\nmy hostname = a\n", 2, "bad parameter name 'my hostname'"),
    ("= a\n", 1, "bad parameter name ''"),
    ("  myhostname = a\n", 1, "continuation line without a line before it"),
    ("config_directory = /x\n", 1, "config_directory cannot be set in main.cf; use -c or MAIL_CONFIG"),
])
def test_syntax_errors(tmp_path, text, line, reason):
    e = main_error(tmp_path, text)
    assert (e.line, e.reason) == (line, reason)
    assert str(e) == f"{tmp_path}/main.cf:{line}: {reason}"


@pytest.mark.parametrize("name, value, typed", [
    ("queue_run_delay", "300", 300),
    ("queue_run_delay", "300s", 300),
    ("queue_run_delay", "5m", 300),
    ("queue_run_delay", "2h", 7200),
    ("queue_run_delay", "1d", 86400),
    ("queue_run_delay", "1w", 604800),
    ("queue_run_delay", " 7s ", 7),
    ("maximal_queue_lifetime", "2", 2 * 86400),      # default unit: days
    ("maximal_queue_lifetime", "12h", 12 * 3600),
    ("delay_warning_time", "4", 4 * 3600),           # default unit: hours
    ("message_size_limit", "0", 0),
    ("message_size_limit", "52428800", 52428800),
    ("smtpd_recipient_limit", "1000", 1000),
    ("smtpd_helo_required", "yes", True),
    ("smtpd_helo_required", "no", False),
    ("smtpd_helo_required", "True", True),
    ("smtpd_helo_required", "false", False),
    ("smtpd_helo_required", "1", True),
    ("smtpd_helo_required", "0", False),
    ("smtpd_helo_required", "on", True),
    ("smtpd_helo_required", "off", False),
    ("mynetworks", "127.0.0.0/8, [::1]/128", ["127.0.0.0/8", "[::1]/128"]),
    ("mynetworks", "a b,c ,, d", ["a", "b", "c", "d"]),
    ("mynetworks", "", []),
    ("smtpd_banner", "any text", "any text"),
])
def test_typed_values(tmp_path, name, value, typed):
    cfg = load_main(tmp_path, f"{name} = {value}\n")
    assert cfg[name] == typed
    assert getattr(cfg, name) == typed


@pytest.mark.parametrize("name, value, reason", [
    ("queue_run_delay", "10x", "bad time value '10x': use a number with an optional unit s, m, h, d or w"),
    ("queue_run_delay", "1.5h", "bad time value '1.5h'"),
    ("queue_run_delay", "-5s", "bad time value '-5s'"),
    ("queue_run_delay", "h", "bad time value 'h'"),
    ("message_size_limit", "10M", "bad size value '10M'"),
    ("message_size_limit", "-1", "bad size value '-1'"),
    ("smtpd_recipient_limit", "many", "bad numerical value 'many'"),
    ("smtpd_recipient_limit", "1.5", "bad numerical value '1.5'"),
    ("smtpd_recipient_limit", "-3", "bad numerical value '-3'"),
    ("smtpd_recipient_limit", "\u0662", "bad numerical value '\u0662'"),
    ("smtpd_helo_required", "maybe", "bad boolean value 'maybe': use yes or no"),
    ("smtpd_helo_required", "", "bad boolean value '': use yes or no"),
])
def test_bad_typed_values(tmp_path, name, value, reason):
    e = main_error(tmp_path, f"myhostname = h\n{name} = {value}\n")
    assert e.line == 2
    assert e.reason.startswith(f"{name}: {reason}")
    assert str(e).startswith(f"{tmp_path}/main.cf:2: {name}: ")


def test_type_is_checked_after_expansion(tmp_path):
    cfg = load_main(tmp_path, "my_limit = 2048\nmessage_size_limit = $my_limit\n")
    assert cfg.message_size_limit == 2048
    e = main_error(tmp_path, "my_limit = lots\nmessage_size_limit = ${my_limit}\n")
    assert str(e) == f"{tmp_path}/main.cf:2: message_size_limit: bad size value 'lots'"


def test_a_default_broken_by_a_setting_names_main_cf(tmp_path):
    # smtp_destination_concurrency_limit defaults to $default_destination_concurrency_limit.
    e = main_error(tmp_path, "default_destination_concurrency_limit = many\n")
    assert e.line == 1
    assert e.reason == "default_destination_concurrency_limit: bad numerical value 'many'"


# --- overrides ------------------------------------------------------------------------


def test_overrides_take_precedence(tmp_path):
    cfg = load_main(tmp_path, "myhostname = a\n", overrides={"myhostname": "b", "relayhost": "$myhostname"})
    assert cfg.myhostname == "b"
    assert cfg.relayhost == "b"
    assert cfg.where("myhostname") == ("-o", None)


def test_bad_override_names_its_source(tmp_path):
    write(tmp_path, "main.cf", "")
    with pytest.raises(ConfigError) as info:
        config.load(str(tmp_path), overrides={"nosuch": "1"})
    assert str(info.value) == "-o: unknown parameter 'nosuch'"


def test_with_overrides_keeps_main_cf(tmp_path):
    cfg = load_main(tmp_path, "myhostname = a\nsmtpd_tls_security_level = may\n")
    service = cfg.with_overrides({"smtpd_tls_security_level": "encrypt"}, source="master.cf")
    assert service.smtpd_tls_security_level == "encrypt"
    assert service.myhostname == "a"
    assert cfg.smtpd_tls_security_level == "may"
    with pytest.raises(ConfigError) as info:
        cfg.with_overrides({"smtpd_timeout": "soon"}, source="master.cf")
    assert str(info.value) == "master.cf: smtpd_timeout: bad time value 'soon': " \
                              "use a number with an optional unit s, m, h, d or w"


def test_find_config_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MAIL_CONFIG", raising=False)
    assert config.find_config_dir() == "/etc/pymta"
    monkeypatch.setenv("MAIL_CONFIG", str(tmp_path))
    assert config.find_config_dir() == str(tmp_path)
    assert config.find_config_dir("/x/etc") == "/x/etc"
    monkeypatch.chdir(tmp_path)
    assert config.find_config_dir("etc") == os.path.join(str(tmp_path), "etc")


# --- master.cf ------------------------------------------------------------------------

MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
127.0.0.1:2525 inet  n       -       n       -       -       smtpd
[::1]:2587     inet  n       y       n       -       10      submission
  -o smtpd_tls_security_level=encrypt
  -osmtpd_sasl_auth_enable=yes -v
smtp           inet  -       -       -       -       0       smtpd
pickup         unix  n       -       n       60      1       pickup
qmgr           unix  n       -       n       300?    1       qmgr
local          unix  -       n       y       -       -       local  -D  extra
"""


def test_master_columns(tmp_path):
    e = master_entries(tmp_path, MASTER_CF)
    assert [x.key for x in e] == [("127.0.0.1:2525", "inet"), ("[::1]:2587", "inet"), ("smtp", "inet"),
                                  ("pickup", "unix"), ("qmgr", "unix"), ("local", "unix")]
    smtpd, sub, smtp, pickup, qmgr, local = e
    assert (smtpd.host, smtpd.port, smtpd.service_name) == ("127.0.0.1", 2525, "2525")
    assert (sub.host, sub.port) == ("::1", 2587)
    assert (smtp.host, smtp.port, smtp.service_name) == ("", 25, "smtp")
    # private: '-' is y for unix, and inet services are never private.
    assert [x.private for x in e] == [False, False, False, False, False, True]
    # unpriv: '-' is y.  chroot: '-' is n.
    assert [x.unpriv for x in e] == [True, True, True, True, True, False]
    assert [x.chroot for x in e] == [False, False, False, False, False, True]
    assert [(x.wakeup, x.wakeup_conditional) for x in e] == [
        (0, False), (0, False), (0, False), (60, False), (300, True), (0, False)]
    # maxproc '-' is -1: default_process_limit, resolved by the master.
    assert [x.maxproc for x in e] == [-1, 10, 0, 1, 1, -1]
    assert [x.command for x in e] == ["smtpd", "submission", "smtpd", "pickup", "qmgr", "local"]
    assert local.args == ["-D", "extra"]
    assert [x.line for x in e] == [2, 3, 6, 7, 8, 9]
    assert all(x.file == str(tmp_path / "master.cf") for x in e)


def test_master_o_forms_and_continuation_lines(tmp_path):
    sub = master_entries(tmp_path, MASTER_CF)[1]
    assert sub.overrides == {"smtpd_tls_security_level": "encrypt", "smtpd_sasl_auth_enable": "yes"}
    assert sub.args == ["-v"]
    assert sub.text == ("[::1]:2587 inet n y n - 10 submission -o smtpd_tls_security_level=encrypt "
                        "-osmtpd_sasl_auth_enable=yes -v")


def test_master_o_value_may_hold_equals_and_references(tmp_path):
    e = master_entries(tmp_path, "x unix - - n - - smtpd -o smtpd_banner=$myhostname=ok\n")
    assert e[0].overrides == {"smtpd_banner": "$myhostname=ok"}


def test_master_same_name_different_type(tmp_path):
    e = master_entries(tmp_path, "smtp inet n - n - - smtpd\nsmtp unix - - n - - smtp\n")
    assert [x.key for x in e] == [("smtp", "inet"), ("smtp", "unix")]


def test_master_empty_file(tmp_path):
    assert master_entries(tmp_path, "# nothing\n\n") == []


def test_master_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        config.load_master(str(tmp_path))
    assert str(info.value) == f"{tmp_path}/master.cf: file not found"


@pytest.mark.parametrize("line, reason", [
    ("smtp fifo n - n - - smtpd", "unknown service type 'fifo' (supported: inet, unix)"),
    ("smtp pass n - n - - smtpd", "unknown service type 'pass' (supported: inet, unix)"),
    ("smtp inet n - n - x smtpd", "bad maximal process count 'x': use -, 0 or a positive number"),
    ("smtp inet n - n - -1 smtpd", "bad maximal process count '-1': use -, 0 or a positive number"),
    ("smtp inet n - n - \u00b2 smtpd", "bad maximal process count '\u00b2': use -, 0 or a positive number"),
    ("qmgr unix n - n soon 1 qmgr", "bad wakeup time 'soon': use -, N or N?"),
    ("qmgr unix n - n 300?? 1 qmgr", "bad wakeup time '300??': use -, N or N?"),
    ("qmgr unix n - n -5 1 qmgr", "bad wakeup time '-5': use -, N or N?"),
    ("127.0.0.1:0 inet n - n - - smtpd", "bad port '0' in inet service '127.0.0.1:0': must be 1-65535"),
    ("65536 inet n - n - - smtpd", "bad port '65536' in inet service '65536': must be 1-65535"),
    ("127.0.0.1:nosuchservice inet n - n - - smtpd",
     "bad port 'nosuchservice' in inet service '127.0.0.1:nosuchservice'"),
    ("127.0.0.1: inet n - n - - smtpd", "bad port '' in inet service '127.0.0.1:'"),
    ("127.0.0.1:2\u00b2 inet n - n - - smtpd", "bad port '2\u00b2' in inet service '127.0.0.1:2\u00b2'"),
    ("[::1]2525 inet n - n - - smtpd", "bad inet service '[::1]2525': use [address]:port"),
    ("[::1:2525 inet n - n - - smtpd", "bad inet service '[::1:2525': use [address]:port"),
    ("smtp inet y - n - - smtpd", "inet service 'smtp' cannot be private"),
    ("smtp inet x - n - - smtpd", "bad private column 'x': use y, n or -"),
    ("smtp inet n yes n - - smtpd", "bad unpriv column 'yes': use y, n or -"),
    ("smtp inet n - Y - - smtpd", "bad chroot column 'Y': use y, n or -"),
    ("smtp inet n - n - -", "expected 8 columns (service type private unpriv chroot wakeup maxproc command), found 7"),
    ("smtp inet n - n - - sm|tpd", "bad command name 'sm|tpd'"),
    ("smtp inet n - n - - smtpd -o", "-o without name=value"),
    ("smtp inet n - n - - smtpd -o smtpd_banner", "bad -o setting 'smtpd_banner': use -o name=value"),
    ("smtp inet n - n - - smtpd -o =x", "bad -o setting '=x': use -o name=value"),
    ("smtp inet n - n - - smtpd -o nosuch=1", "unknown parameter 'nosuch' in -o nosuch=1"),
    ("smtp inet n - n - - smtpd -onosuch=1", "unknown parameter 'nosuch' in -o nosuch=1"),
])
def test_master_errors(tmp_path, line, reason):
    e = master_error(tmp_path, f"# header\npickup unix n - n 60 1 pickup\n{line}\n")
    assert str(e) == f"{tmp_path}/master.cf:3: {reason}"


def test_master_error_in_a_continued_line_names_its_first_line(tmp_path):
    e = master_error(tmp_path, "smtp inet n - n - - smtpd\n  -o smtpd_banner=x\n  -o nosuch=y\n")
    assert str(e) == f"{tmp_path}/master.cf:1: unknown parameter 'nosuch' in -o nosuch=y"


def test_master_duplicate_service(tmp_path):
    e = master_error(tmp_path, "smtp inet n - n - - smtpd\npickup unix n - n 60 1 pickup\n"
                               "# again\nsmtp inet n - n - 5 smtpd\n")
    assert str(e) == f"{tmp_path}/master.cf:4: duplicate service 'smtp/inet' (first defined at line 1)"


def test_master_continuation_without_a_line(tmp_path):
    e = master_error(tmp_path, "# header\n  -o smtpd_banner=x\n")
    assert str(e) == f"{tmp_path}/master.cf:2: continuation line without a line before it"
