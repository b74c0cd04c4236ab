"""`pymta init`: the instance layout, modes, certificate, refusal to overwrite."""

import os
import pwd
import stat

from cryptography import x509

from tests.conftest import BIN, DOMAIN, HOSTNAME, run


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_layout_and_modes(instance):
    top = instance.top
    for path in ("etc/main.cf", "etc/master.cf", "etc/aliases", "etc/users",
                 "etc/tls/cert.pem", "etc/tls/key.pem", "log/maillog"):
        assert os.path.isfile(os.path.join(top, path)), path
    for path in ("spool/maildrop", "spool/incoming", "spool/active", "spool/deferred",
                 "spool/hold", "spool/corrupt", "mail", "run/public", "run/private"):
        assert os.path.isdir(os.path.join(top, path)), path
    assert mode(os.path.join(top, "etc/tls/key.pem")) == 0o600
    assert mode(os.path.join(top, "run/private")) == 0o700
    assert mode(os.path.join(top, "spool/incoming")) == 0o700
    assert mode(os.path.join(top, "mail")) == 0o700
    assert mode(os.path.join(top, "etc/users")) == 0o640
    if os.geteuid() == 0:
        owner = pwd.getpwnam("pymta").pw_uid
        assert os.stat(os.path.join(top, "spool/incoming")).st_uid == owner
        assert os.stat(os.path.join(top, "etc/tls/key.pem")).st_uid == owner
        assert os.stat(os.path.join(top, "mail")).st_uid == owner


def test_main_cf_and_master_cf_are_filled_in(instance):
    main_cf = open(os.path.join(instance.etc, "main.cf")).read()
    assert f"myhostname = {HOSTNAME}" in main_cf
    assert f"mydomain = {DOMAIN}" in main_cf
    assert "# " in main_cf          # commented for the operator
    master_cf = open(os.path.join(instance.etc, "master.cf")).read()
    assert f"127.0.0.1:{instance.ports['smtp']}" in master_cf
    assert "@" not in master_cf.replace("-o", "")     # no placeholder left
    p = run([os.path.join(BIN, "postconf"), "-c", instance.etc, "-h", "myhostname", "mydomain"])
    assert p.stdout.split() == [HOSTNAME, DOMAIN]
    aliases = open(os.path.join(instance.etc, "aliases")).read()
    for name in ("postmaster:", "abuse:", "MAILER-DAEMON:"):
        assert name in aliases


def test_certificate_is_for_the_hostname(instance):
    with open(os.path.join(instance.etc, "tls", "cert.pem"), "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert HOSTNAME in names.get_values_for_type(x509.DNSName)


def test_init_refuses_an_existing_instance(instance):
    before = open(os.path.join(instance.etc, "main.cf")).read()
    p = run([os.path.join(BIN, "pymta"), "init", instance.top], check=False)
    assert p.returncode != 0
    assert "already holds an instance" in p.stderr
    assert open(os.path.join(instance.etc, "main.cf")).read() == before


def test_init_with_ipv6_listen_address(tmp_path):
    top = tmp_path / "v6"
    run([os.path.join(BIN, "pymta"), "init", str(top), "--listen", "::1", "--port-offset", "100"])
    master_cf = (top / "etc" / "master.cf").read_text()
    assert "[::1]:2625" in master_cf
