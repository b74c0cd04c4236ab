"""`pymta user add|passwd|del|list` on a real instance's etc/users."""

import os
import pty
import select
import stat
import sys
import time

from pymta.core import users
from tests.conftest import run

USER_CMD = [sys.executable, "-c",
            "from pymta.cli.user import user; user(prog_name='pymta user')"]


def user_cmd(inst, *args, input=None, check=False):
    return run(USER_CMD + ["-c", inst.etc, *args], input=input, check=check)


def users_file(inst):
    return os.path.join(inst.etc, "users")


def test_add_list_passwd_del(instance):
    inst = instance
    path = users_file(inst)
    before = os.stat(path)
    p = user_cmd(inst, "add", f"alice@{inst.domain}", input="s3cret pass\n")
    assert p.returncode == 0, p.stderr
    assert p.stdout == f"pymta: added user alice@{inst.domain}\n"
    p = user_cmd(inst, "add", f"Bob@{inst.domain}", input="other")
    assert p.returncode == 0, p.stderr
    entries = users.list_users(path)
    assert [e.address for e in entries] == [f"alice@{inst.domain}", f"Bob@{inst.domain}"]
    assert entries[0].password.startswith("{ARGON2ID}$argon2id$v=19$")
    assert users.verify_password(entries[0].password, "s3cret pass")
    assert users.verify_password(entries[1].password, "other")
    after = os.stat(path)
    assert stat.S_IMODE(after.st_mode) == stat.S_IMODE(before.st_mode) == 0o640
    assert (after.st_uid, after.st_gid) == (before.st_uid, before.st_gid)

    p = user_cmd(inst, "list")
    assert p.returncode == 0
    assert p.stdout == f"alice@{inst.domain}\nBob@{inst.domain}\n"

    p = user_cmd(inst, "passwd", f"ALICE@{inst.domain}", input="new one\r\n")
    assert p.returncode == 0, p.stderr
    entry = users.read_users(path).lookup(f"alice@{inst.domain}")
    assert users.verify_password(entry.password, "new one")
    assert not users.verify_password(entry.password, "s3cret pass")

    box = inst.path("mail", inst.domain, "alice")
    os.makedirs(os.path.join(box, "new"))
    p = user_cmd(inst, "del", f"alice@{inst.domain}")
    assert p.returncode == 0, p.stderr
    assert f"removed user alice@{inst.domain}" in p.stdout
    assert f"the mailbox {box} is kept" in p.stdout
    assert os.path.isdir(box)
    assert [e.address for e in users.list_users(path)] == [f"Bob@{inst.domain}"]
    p = user_cmd(inst, "del", f"bob@{inst.domain}")
    assert p.returncode == 0 and "has no mailbox" in p.stdout
    assert user_cmd(inst, "list").stdout == ""


def test_refusals_and_exit_codes(instance):
    inst = instance
    addr = f"carol@{inst.domain}"
    assert user_cmd(inst, "add", addr, input="pw\n").returncode == 0
    with open(users_file(inst), "rb") as f:
        content = f.read()

    p = user_cmd(inst, "add", addr.upper(), input="again\n")
    assert p.returncode == 73 and f"user {addr} exists" in p.stderr
    for bad in ("no-at-sign", "a/b@x.example", "a@-bad-.example", "a@b@c"):
        p = user_cmd(inst, "add", bad, input="pw\n")
        assert p.returncode == 64, (bad, p.stderr)
    p = user_cmd(inst, "add", f"dave@{inst.domain}", input="\n")
    assert p.returncode == 65 and "empty password" in p.stderr
    p = user_cmd(inst, "add", f"dave@{inst.domain}", input=b"x" * 2000 + b"\n")
    assert p.returncode == 65
    p = user_cmd(inst, "passwd", f"nobody@{inst.domain}", input="pw\n")
    assert p.returncode == 67 and "no such user" in p.stderr
    p = user_cmd(inst, "del", f"nobody@{inst.domain}")
    assert p.returncode == 67
    with open(users_file(inst), "rb") as f:
        assert f.read() == content           # nothing changed by the refusals
    assert "pw" not in p.stderr + p.stdout

    p = user_cmd(inst, "add", "erin@elsewhere.example", input="pw\n")
    assert p.returncode == 0
    assert "elsewhere.example is not in virtual_mailbox_domains" in p.stderr

    with open(os.path.join(inst.etc, "main.cf"), "a") as f:
        f.write("virtual_mailbox_maps = texthash:/etc/nothing\n")
    p = user_cmd(inst, "list")
    assert p.returncode == 78 and "passwd-file" in p.stderr


def _with_terminal(args, answers):
    """Run args on a pseudo-terminal, typing each answer after a prompt."""
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(args[0], args)
    output = b""
    since = 0                   # where the output after the last answer starts
    pending = list(answers)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1)
            if not ready:
                continue
            try:
                data = os.read(fd, 4096)
            except OSError:         # EIO: the program has exited
                break
            if not data:
                break
            output += data
            if pending and b"password:" in output[since:]:
                time.sleep(0.2)     # let getpass switch the echo off first
                os.write(fd, pending.pop(0).encode() + b"\n")
                since = len(output)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


def test_password_prompted_twice_on_a_terminal(instance):
    inst = instance
    args = USER_CMD + ["-c", inst.etc, "add", f"frank@{inst.domain}"]
    code, out = _with_terminal(args, ["one", "two"])
    assert code == 65 and "do not match" in out
    assert users.read_users(users_file(inst)).lookup(f"frank@{inst.domain}") is None
    code, out = _with_terminal(args, ["typed pw", "typed pw"])
    assert code == 0, out
    assert "New password:" in out and "Retype new password:" in out
    assert "typed pw" not in out                # no echo
    entry = users.read_users(users_file(inst)).lookup(f"frank@{inst.domain}")
    assert users.verify_password(entry.password, "typed pw")
