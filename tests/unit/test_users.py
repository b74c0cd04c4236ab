"""Tests for pymta.core.users: the etc/users passwd-file and password checks."""

import dataclasses
import os
import re
import stat
import statistics
import threading
import time

import argon2
import pytest

from pymta.core import users as u

# Cheap argon2id parameters so the tests that hash many passwords stay fast.
CHEAP = argon2.Parameters(type=argon2.Type.ID, version=19, salt_len=16, hash_len=32,
                          time_cost=1, memory_cost=8, parallelism=1)

# Reference hashes of "correct horse", made once with Dovecot 2.3.19.1
# (Debian bookworm dovecot-core 1:2.3.19.1+dfsg1-2.1+deb12u7):
#   doveadm pw -s ARGON2ID -p 'correct horse'   (and -s ARGON2I, SHA512-CRYPT, ...)
DOVEADM = {
    "ARGON2ID": "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$dUojQNuvTn6xh0jUtucnRQ"
                "$0JH9rQwQa2xnW2Ajdkh47zsWVXFjgcXUfNh/8ouShSM",
    "ARGON2I": "{ARGON2I}$argon2i$v=19$m=32768,t=4,p=1$bfQrPVFTTWglcyor4prygg"
               "$6eAxyQVGYOlZbKFkwp21i2cEKbJKtC6iH7jgW42zf+M",
    "SHA512-CRYPT": "{SHA512-CRYPT}$6$61C4hxtd9Vzb/Y3d$Ind9ZchwS/ROgTi/iAo7vos/T82HsJvuzNgFbIs8"
                    "cv8EQ.3imhoOcFSJMlakCSlSM6Hx47IZbU34XgvcW9KMl.",
    "SHA256-CRYPT": "{SHA256-CRYPT}$5$k0lUVWi1H1/2eDXO$1T1A/PVrcQ9qFicziWBBuYB8c/jrq.Eie7LNq8mPlC0",
    "PLAIN": "{PLAIN}correct horse",
}
# Same origin, for the schemes we refuse.
DOVEADM_UNSUPPORTED = {
    "CRYPT (bcrypt)": ("{CRYPT}$2y$05$GkHWz/NZWWhwgdYle.KzWuTr0noFzX67E2yRuvph8KmdS/xjiZ0uC",
                       "bcrypt"),
    "BLF-CRYPT": ("{BLF-CRYPT}$2y$05$3fSLTLAtyOEZA22j28UCX.yH82XiBfyI9MNqzzr0vd2X8uoJ/k2Om",
                  "BLF-CRYPT"),
    "SSHA512": ("{SSHA512}gjlAvZaJjTwWa+VyUAIHKi+Z2QfS3kTKsB6iqYJgQBl3TVZEGgTGyw1xIlitNU1aQ3UHnSO0"
                "Rakg1TP5+gFnYm9xnRw=", "SSHA512"),
    "SCRAM-SHA-256": ("{SCRAM-SHA-256}4096,9mGW5P8J6UfWRDmQc+2GpQ==,5YO1/L/bg8CFLflO5Xpi54B9hN2KOWd3"
                      "uEeM/djjd5Q=,lJMWBNwqNJ0AuQbj+i+uaU4X40PPKItZy+Qv8LwsZsU=", "SCRAM-SHA-256"),
    "yescrypt": ("{CRYPT}$y$j9T$abcdefghijklmnop$0123456789abcdefghijklmnopqrstuvwxyzABCDE", "yescrypt"),
    "DES": ("{CRYPT}abJnggxhB/yWI", "DES"),
}

# SHA-crypt vectors from other implementations: doveadm (rounds, long and
# non-ASCII passwords), OpenSSL 3.0 `openssl passwd -5/-6` (long salt
# truncated to 16), and the SHA-crypt specification's first vector.
SHA_CRYPT_VECTORS = [
    ("Hello world!", "$5$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc5"),
    ("Hello world!", "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTL"
                     "iBFdcbYEdFCoEOfaS35inz1"),
    ("Hello world!", "$6$toolongsaltstrin$iGlL7EUUfzNQx59x3ydJZ.zXPMUu1dOynSEl/vcNhLlas77qD0DzRswhh"
                     "B6LdrXTz250at0syAfUXra.XrxAI1"),
    ("This is just a test", "$5$rounds=5000$usesomesillystri$rUxPksM7UqStg1d6lV2ndf1Sj/qMGdLNAKiJI"
                            "t5MGGC"),
    ("p4ss:wörd with a very long passphrase that exceeds sixty-four bytes in length!",
     "{SHA512-CRYPT}$6$rounds=10000$Xb.2.Rqz16AM2nBR$tIH6FhUQK3tQCTVbPkBOiKLSPFmdx4UCcwFq8B7Sb7wc."
     "aGLZEXSlcOkmoFuJF4ZOpKpkeZ9AKIq0dyo.wqpb/"),
    ("é", "{SHA256-CRYPT}$5$rounds=1000$vNSgEeegbpfaU1A3$ZD834cJ9dYzXMiKn/EFne8SSEIjTkZ5PNQaFpaEo18D"),
]


def write(path, text, mode=0o640):
    path.write_text(text)
    os.chmod(path, mode)
    return path


def cheap_hash(password):
    return u.hash_password(password, CHEAP)


# ---------------------------------------------------------------- hashing

@pytest.mark.parametrize("scheme", sorted(DOVEADM))
def test_doveadm_hashes_verify(scheme):
    assert u.verify_password(DOVEADM[scheme], "correct horse")
    assert u.verify_password(DOVEADM[scheme], b"correct horse")
    assert not u.verify_password(DOVEADM[scheme], "correct horsE")
    assert not u.verify_password(DOVEADM[scheme], "")


@pytest.mark.parametrize("password,stored", SHA_CRYPT_VECTORS, ids=range(len(SHA_CRYPT_VECTORS)))
def test_sha_crypt_vectors(password, stored):
    assert u.verify_password(stored, password)
    assert u.verify_password("{CRYPT}" + stored.split("}")[-1], password)
    assert not u.verify_password(stored, password + "x")


@pytest.mark.parametrize("name", sorted(DOVEADM_UNSUPPORTED))
def test_unsupported_schemes_are_refused_clearly(name):
    stored, word = DOVEADM_UNSUPPORTED[name]
    with pytest.raises(u.PasswordSchemeError, match=word):
        u.verify_password(stored, "x")


def test_scheme_prefix_is_case_insensitive():
    assert u.verify_password("{plain}abc", "abc")
    assert u.verify_password(DOVEADM["ARGON2ID"].replace("{ARGON2ID}", "{argon2id}"),
                             "correct horse")


@pytest.mark.parametrize("stored,reason", [
    ("", "no password"),
    ("{PLAIN}", "no password"),
    ("{ARGON2ID}$argon2i$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaA", "does not start"),
    ("{ARGON2ID}$argon2id$garbage", "malformed"),
    ("{ARGON2ID}$argon2id$v=19$m=4194304,t=3,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNo", "limit"),
    ("{SHA512-CRYPT}$6$rounds=5000000$salt$" + "a" * 86, "limit"),
    ("{SHA512-CRYPT}$6$salt$tooshort", "length"),
    ("{SHA256-CRYPT}$6$salt$" + "a" * 86, "not a SHA-crypt"),
    ("{BROKEN", "prefix"),
])
def test_malformed_hashes(stored, reason):
    with pytest.raises(u.PasswordSchemeError, match=reason):
        u.check_password_hash(stored)


def test_hash_password_writes_doveadm_compatible_argon2id():
    stored = u.hash_password("s3cret")
    assert stored.startswith("{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=4$")
    assert u.verify_password(stored, "s3cret")
    assert not u.verify_password(stored, "s3creT")
    params = argon2.extract_parameters(stored[len("{ARGON2ID}"):])
    assert (params.salt_len, params.hash_len) == (16, 32)


def test_hash_password_salts():
    assert cheap_hash("same") != cheap_hash("same")


@pytest.mark.parametrize("bad", ["", "a\0b", "line\nbreak", "x" * 1025])
def test_hash_password_rejects_bad_passwords(bad):
    with pytest.raises(ValueError):
        u.hash_password(bad, CHEAP)


def test_overlong_password_never_verifies():
    stored = "{PLAIN}" + "x" * 2000
    assert not u.verify_password(stored, "x" * 2000)


# ---------------------------------------------------------------- addresses

@pytest.mark.parametrize("address", [
    "alice@example.org", "a.b+tag@mail.example.org", "x@localhost", "O'Brien@xn--bcher-kva.example",
])
def test_valid_addresses(address):
    assert u.validate_address(address) == address


@pytest.mark.parametrize("address", [
    "alice", "@example.org", "alice@", "a@b@c", "../etc@example.org", "a/b@example.org",
    ".alice@example.org", "al..ice@example.org", "alice.@example.org", "#alice@example.org",
    "al ice@example.org", "alice@exa_mple.org", "alice@-example.org", "alice@example..org",
    "x" * 65 + "@example.org", "alice@" + "a" * 64 + ".org", "ålice@example.org",
    "alice@exämple.org", "a:b@example.org", "alice@example.org\n",
])
def test_invalid_addresses(address):
    with pytest.raises(u.InvalidAddressError):
        u.validate_address(address)


# ---------------------------------------------------------------- parsing

def test_parse_dovecot_passwd_file():
    text = (
        "# users of example.org\n"
        "\n"
        "   \t\n"
        f"alice@example.org:{DOVEADM['ARGON2ID']}::::::\n"
        "bob@Example.ORG:{PLAIN}pw:1000:1000:Bob B:/home/bob:/bin/sh:userdb_quota_rule=*:storage=1G\r\n"
        "carol@example.org:{PLAIN}short\n"
        "    # indented comment\n"
    )
    users = u.parse_users(text, "etc/users")
    assert len(users) == 3
    alice = users.lookup("ALICE@example.org")
    assert alice.address == "alice@example.org" and alice.line == 4 and alice.usable
    assert alice.scheme == "ARGON2ID"
    bob = users.lookup("bob@example.org")
    assert (bob.uid, bob.gid, bob.gecos, bob.home, bob.shell) == ("1000", "1000", "Bob B", "/home/bob", "/bin/sh")
    assert bob.extra_fields == "userdb_quota_rule=*:storage=1G"
    assert bob.format() + "\r" == text.splitlines(keepends=True)[4].rstrip("\n")
    assert users.lookup("carol@example.org").password == "{PLAIN}short"
    assert users.lookup("dave@example.org") is None
    assert users.lookup(b"alice@example.org") is None
    assert users.problems == []


def test_password_is_not_in_repr():
    entry = u.parse_users("a@b.c:{PLAIN}topsecret\n").lookup("a@b.c")
    assert "topsecret" not in repr(entry)


@pytest.mark.parametrize("bad,reason", [
    ("nocolon", "expected address:password"),
    ("../../etc@example.org:{PLAIN}x", "bad local part"),
    ("jörg@example.org:{PLAIN}x", "bad local part"),
    ("alice:{PLAIN}x", "not a user@domain address"),
    (b"a@example.org:{PLAIN}\xff", "not valid UTF-8"),
    ("a@example.org:{PLAIN}x\0y", "NUL"),
    ("a@example.org:{PLAIN}x\ry", "carriage return"),
    (" a@example.org:{PLAIN}x", "white space"),
    ("a@example.org:{PLAIN}" + "x" * 9000, "longer than"),
])
def test_bad_lines_are_skipped_and_reported(bad, reason):
    bad = bad if isinstance(bad, bytes) else bad.encode()
    data = b"ok@example.org:{PLAIN}x\n" + bad + b"\nlast@example.org:{PLAIN}y\n"
    users = u.parse_users(data, "etc/users")
    assert sorted(users.entries) == ["last@example.org", "ok@example.org"]
    assert len(users.problems) == 1
    line, text = users.problems[0]
    assert line == 2 and re.search(reason, text), text
    assert users.lookup("a@example.org") is None


def test_duplicates_first_line_wins():
    users = u.parse_users("a@example.org:{PLAIN}x\n\nA@EXAMPLE.org:{PLAIN}y\n", "users")
    assert users.lookup("a@example.org").password == "{PLAIN}x"
    assert users.problems == [(3, "duplicate user A@EXAMPLE.org ignored (first on line 1)")]


def test_only_oversized_files_are_fatal(monkeypatch):
    monkeypatch.setattr(u, "MAX_FILE_SIZE", 10)
    with pytest.raises(u.UsersFileError, match="larger than 10 bytes"):
        u.parse_users("a@example.org:{PLAIN}x\n", "users")


def test_unverifiable_entries_are_listed_not_fatal():
    text = (f"good@example.org:{DOVEADM['PLAIN']}\n"
            f"old@example.org:{DOVEADM_UNSUPPORTED['BLF-CRYPT'][0]}\n"
            "nopw@example.org:\n")
    users = u.parse_users(text, "users")
    assert users.lookup("good@example.org").usable
    assert not users.lookup("old@example.org").usable
    assert [line for line, _ in users.problems] == [2, 3]
    assert "BLF-CRYPT" in users.problems[0][1] and "no password set" in users.problems[1][1]


def test_parse_accepts_empty_and_comment_only_files():
    assert len(u.parse_users("")) == 0
    assert len(u.parse_users("# nothing\n\n")) == 0


def test_read_users_refuses_symlinks_and_big_files(tmp_path, monkeypatch):
    real = write(tmp_path / "real", "a@b.org:{PLAIN}x\n")
    (tmp_path / "users").symlink_to(real)
    with pytest.raises(u.UsersFileError, match="users"):
        u.read_users(tmp_path / "users")
    monkeypatch.setattr(u, "MAX_FILE_SIZE", 10)
    with pytest.raises(u.UsersFileError, match="larger than 10 bytes"):
        u.read_users(real)


def test_users_file_error_is_a_config_error(tmp_path):
    from pymta.core.errors import ConfigError, PymtaError
    with pytest.raises(ConfigError) as info:
        u.read_users(tmp_path / "users")
    assert isinstance(info.value, u.UsersError) and isinstance(info.value, PymtaError)
    assert (info.value.file, info.value.line) == (str(tmp_path / "users"), None)
    assert str(info.value) == f"{tmp_path / 'users'}: No such file or directory"


def test_read_users_missing_file(tmp_path):
    with pytest.raises(u.UsersFileError, match="No such file"):
        u.read_users(tmp_path / "users")


# ---------------------------------------------------------------- UsersDB

def test_authenticate_each_scheme(tmp_path):
    lines = [f"{scheme.lower()}@example.org:{stored}\n" for scheme, stored in DOVEADM.items()]
    db = u.UsersDB(write(tmp_path / "users", "".join(lines)))
    for scheme in DOVEADM:
        address = f"{scheme.upper()}@example.org"
        verdict = db.authenticate(address, b"correct horse")
        assert verdict.ok and verdict.user == f"{scheme.lower()}@example.org", scheme
        bad = db.authenticate(address, "wrong")
        assert bad.status is u.AuthStatus.MISMATCH and not bad.ok and bad.user is None


def test_authenticate_unknown_and_unusable(tmp_path):
    path = write(tmp_path / "users", "old@example.org:{CRYPT}$2y$05$abcdefghijklmnopqrstuv"
                                     "ABCDEFGHIJKLMNOPQRSTUVWXYZ01234\n")
    db = u.UsersDB(path)
    unknown = db.authenticate("nobody@example.org", "pw")
    assert unknown.status is u.AuthStatus.UNKNOWN_USER and unknown.entry is None
    unusable = db.authenticate("old@example.org", "pw")
    assert unusable.status is u.AuthStatus.UNUSABLE
    assert unusable.reason.startswith(f"{path}:1: ") and "bcrypt" in unusable.reason


def test_every_path_runs_exactly_one_argon2_verification(tmp_path, monkeypatch):
    text = (f"argon@example.org:{cheap_hash('pw')}\n"
            "plain@example.org:{PLAIN}pw\n"
            f"sha@example.org:{SHA_CRYPT_VECTORS[0][1]}\n"
            "old@example.org:{BLF-CRYPT}$2y$05$x\n")
    db = u.UsersDB(write(tmp_path / "users", text))
    calls = []
    real = u._argon2_verify
    monkeypatch.setattr(u, "_argon2_verify", lambda encoded, raw: calls.append(encoded) or real(encoded, raw))
    for user in ("argon", "plain", "sha", "old", "nobody"):
        for password in ("pw", "wrong"):
            calls.clear()
            db.authenticate(f"{user}@example.org", password)
            assert len(calls) == 1, (user, password)


def test_dummy_hash_costs_what_the_file_costs(tmp_path):
    db = u.UsersDB(write(tmp_path / "users", f"a@example.org:{DOVEADM['ARGON2ID']}\n"))
    assert not db.authenticate("nobody@example.org", "x").ok
    dummy = argon2.extract_parameters(db._dummy)
    real = argon2.extract_parameters(DOVEADM["ARGON2ID"][len("{ARGON2ID}"):])
    assert (dummy.time_cost, dummy.memory_cost, dummy.parallelism) == (3, 65536, 1)
    assert dummy == dataclasses.replace(real, salt_len=dummy.salt_len)


def test_unknown_user_timing_matches_wrong_password(tmp_path):
    params = argon2.Parameters(type=argon2.Type.ID, version=19, salt_len=16, hash_len=32,
                               time_cost=2, memory_cost=16384, parallelism=1)
    db = u.UsersDB(write(tmp_path / "users", f"a@example.org:{u.hash_password('pw', params)}\n"))
    db.authenticate("warm@example.org", "x")

    def median(address):
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            db.authenticate(address, "wrong")
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    known, unknown = median("a@example.org"), median("nobody@example.org")
    # Without the dummy verification the ratio would be ~0.01; allow for a loaded machine.
    assert 0.25 < unknown / known < 4.0, (known, unknown)


def test_usersdb_rereads_only_on_change(tmp_path):
    path = write(tmp_path / "users", "a@example.org:{PLAIN}one\n")
    db = u.UsersDB(path)
    first = db.current()
    assert db.current() is first and db.reloads == 1
    assert db.authenticate("a@example.org", "one").ok
    u.set_password(path, "a@example.org", "two", params=CHEAP)
    assert db.authenticate("a@example.org", "two").ok
    assert not db.authenticate("a@example.org", "one").ok
    assert db.reloads == 2


def test_usersdb_reports_problems_on_each_load(tmp_path):
    path = write(tmp_path / "users", "a@example.org:{PLAIN}one\n")
    loads = []
    db = u.UsersDB(path, on_load=lambda users: loads.append(users.problems))
    assert db.authenticate("a@example.org", "one").ok
    assert db.authenticate("a@example.org", "one").ok
    write(path, "a@example.org:{PLAIN}one\nbroken line\n")
    assert db.authenticate("a@example.org", "one").ok
    assert loads == [[], [(2, "line ignored: expected address:password[:uid:gid:gecos:home:shell:extra]")]]


def test_usersdb_unreadable_file_fails_until_fixed(tmp_path):
    path = write(tmp_path / "users", "a@example.org:{PLAIN}one\n")
    db = u.UsersDB(path)
    assert db.authenticate("a@example.org", "one").ok
    os.rename(path, tmp_path / "moved")
    os.mkdir(path)
    with pytest.raises(u.UsersFileError, match="not a regular file"):
        db.authenticate("a@example.org", "one")
    os.rmdir(path)
    os.rename(tmp_path / "moved", path)
    assert db.authenticate("a@example.org", "one").ok


def test_usersdb_missing_file(tmp_path):
    with pytest.raises(u.UsersFileError, match="No such file"):
        u.UsersDB(tmp_path / "users").authenticate("a@example.org", "x")


# ---------------------------------------------------------------- changes

def test_add_creates_file_0640_atomically(tmp_path):
    path = tmp_path / "users"
    entry = u.add_user(path, "Alice@Example.org", "pw1", params=CHEAP)
    assert entry.address == "Alice@Example.org" and entry.line == 1
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    text = path.read_text()
    assert text.startswith("Alice@Example.org:{ARGON2ID}$argon2id$") and text.endswith("::::::\n")
    assert u.UsersDB(path).authenticate("alice@example.org", "pw1").ok
    assert os.listdir(tmp_path) == ["users"]


def test_add_can_create_0600_and_refuses_other_modes(tmp_path):
    u.add_user(tmp_path / "users", "a@example.org", "pw", params=CHEAP, mode=0o600)
    assert stat.S_IMODE(os.stat(tmp_path / "users").st_mode) == 0o600
    with pytest.raises(ValueError, match="0600 or 0640"):
        u.add_user(tmp_path / "users", "b@example.org", "pw", params=CHEAP, mode=0o644)


def test_changes_keep_comments_fields_and_mode(tmp_path):
    original = ("# header comment\n"
                "bob@example.org:{PLAIN}old:1000:1000:Bob:/home/bob::quota=1G\n"
                "\n"
                "carol@example.org:{PLAIN}c::::::\n")
    path = write(tmp_path / "users", original, mode=0o600)
    old_file = open(path)         # a reader that opened the file before the changes
    u.add_user(path, "dave@example.org", "d", params=CHEAP)
    u.set_password(path, "BOB@example.org", "new", params=CHEAP)
    lines = path.read_text().splitlines()
    assert lines[0] == "# header comment" and lines[2] == "" and lines[3] == "carol@example.org:{PLAIN}c::::::"
    assert lines[1].startswith("bob@example.org:{ARGON2ID}$argon2id$")
    assert lines[1].endswith(":1000:1000:Bob:/home/bob::quota=1G")
    assert lines[4].startswith("dave@example.org:{ARGON2ID}")
    removed = u.delete_user(path, "carol@EXAMPLE.org")
    assert removed.address == "carol@example.org"
    assert [e.address for e in u.list_users(path)] == ["bob@example.org", "dave@example.org"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert old_file.read() == original       # replaced by rename, never rewritten in place
    old_file.close()
    assert sorted(os.listdir(tmp_path)) == ["users"]


def test_group_readable_mode_is_fixed_on_rewrite(tmp_path):
    path = write(tmp_path / "users", "a@example.org:{PLAIN}x\n", mode=0o644)
    u.set_password(path, "a@example.org", "y", params=CHEAP)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_change_errors(tmp_path):
    path = tmp_path / "users"
    u.add_user(path, "a@example.org", "pw", params=CHEAP)
    with pytest.raises(u.UserExistsError, match="a@example.org exists .line 1"):
        u.add_user(path, "A@EXAMPLE.ORG", "pw", params=CHEAP)
    with pytest.raises(u.UnknownUserError):
        u.set_password(path, "b@example.org", "pw", params=CHEAP)
    with pytest.raises(u.UnknownUserError):
        u.delete_user(path, "b@example.org")
    with pytest.raises(u.InvalidAddressError):
        u.add_user(path, "../x@example.org", "pw", params=CHEAP)
    with pytest.raises(ValueError):
        u.add_user(path, "c@example.org", "", params=CHEAP)
    with pytest.raises(u.UsersFileError, match="No such file"):
        u.set_password(tmp_path / "missing", "a@example.org", "pw", params=CHEAP)


def test_changes_keep_bad_lines_byte_for_byte(tmp_path):
    original = b"a@example.org:{PLAIN}x\r\ngarbage \xff\x00\n# note\n"
    path = tmp_path / "users"
    path.write_bytes(original)
    u.add_user(path, "b@example.org", "pw", params=CHEAP)
    data = path.read_bytes()
    assert data.startswith(original) and data.count(b"\n") == 4
    u.set_password(path, "a@example.org", "new", params=CHEAP)
    first, rest = path.read_bytes().split(b"\n", 1)
    assert first.startswith(b"a@example.org:{ARGON2ID}") and first.endswith(b"::::::\r")
    assert rest.startswith(b"garbage \xff\x00\n# note\n")


def test_delete_removes_duplicate_lines_too(tmp_path):
    path = write(tmp_path / "users", "a@example.org:{PLAIN}x\nb@example.org:{PLAIN}b\nA@example.org:{PLAIN}y\n")
    u.delete_user(path, "a@example.org")
    assert path.read_text() == "b@example.org:{PLAIN}b\n"
    assert u.UsersDB(path).lookup("a@example.org") is None


def test_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "users"
    errors = []

    def add(n):
        try:
            u.add_user(path, f"user{n}@example.org", "pw", params=CHEAP)
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(e.address for e in u.list_users(path)) == sorted(f"user{n}@example.org" for n in range(12))
