"""postmap, postalias and newaliases as installed, against a `pymta init`
instance (nothing needs to run)."""

import os
import sqlite3
import stat

from tests.conftest import BIN, run


def cmd(inst, name, *args, input=None, check=True):
    return run([os.path.join(BIN, name), "-c", inst.etc, *args], input=input, check=check)


def write(inst, name, text, mode=0o644):
    path = os.path.join(inst.etc, name)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


def test_postmap_build_and_query(instance):
    path = write(instance, "virtual", "# virtual aliases\nSales@Test.Example  alice@test.example\n"
                                      "@old.example  @test.example\n", mode=0o640)
    p = cmd(instance, "postmap", f"hash:{path}")
    assert p.stdout == "" and p.stderr == ""
    st = os.stat(path + ".db")
    assert stat.S_IMODE(st.st_mode) == 0o640
    with sqlite3.connect(path + ".db") as db:
        assert db.execute("SELECT value FROM map WHERE key='sales@test.example'").fetchone() == (
            "alice@test.example",)
    p = cmd(instance, "postmap", "-q", "SALES@test.example", f"hash:{path}")
    assert p.stdout == "alice@test.example\n"
    p = cmd(instance, "postmap", "-q", "nobody@test.example", f"hash:{path}", check=False)
    assert p.returncode == 1 and p.stdout == ""
    # Without a type: hash; relative to the current directory.
    p = run([os.path.join(BIN, "postmap"), "-q", "@old.example", "virtual"], cwd=instance.etc)
    assert p.stdout == "@test.example\n"
    p = cmd(instance, "postmap", "-q", "-", path, input="nobody\nsales@test.example\n")
    assert p.stdout == "sales@test.example\talice@test.example\n"
    p = cmd(instance, "postmap", "-s", path)
    assert sorted(p.stdout.splitlines()) == ["@old.example\t@test.example",
                                             "sales@test.example\talice@test.example"]
    assert sorted(os.listdir(instance.etc)).count("virtual.db") == 1
    assert not [n for n in os.listdir(instance.etc) if n.endswith(".tmp")]


def test_postmap_mistakes(instance):
    path = write(instance, "map", "k v\n")
    cmd(instance, "postmap", path)
    write(instance, "map", "k changed\nK dup\nbroken\n")
    p = cmd(instance, "postmap", path, check=False)
    assert p.returncode == 1
    assert f"postmap: warning: {path}:2: duplicate entry 'K' ignored" not in p.stderr
    assert p.stderr == f"postmap: fatal: {path}:3: expected format: key whitespace value (got 'broken')\n"
    # The old database is still in place.
    assert cmd(instance, "postmap", "-q", "k", path).stdout == "v\n"
    write(instance, "map", "k changed\nK dup\n")
    p = cmd(instance, "postmap", path)
    assert p.stderr == f"postmap: warning: {path}:2: duplicate entry 'K' ignored (first on line 1)\n"
    assert cmd(instance, "postmap", "-q", "k", path).stdout == "changed\n"
    p = cmd(instance, "postmap", check=False)
    assert p.returncode == 1 and "usage: postmap" in p.stderr
    p = cmd(instance, "postmap", "-q", "k", f"hash:{instance.etc}/nothing", check=False)
    assert p.returncode == 1 and "no such file; build it with: postmap" in p.stderr
    p = cmd(instance, "postmap", "nosuch:/x", check=False)
    assert p.returncode == 1 and "unsupported type 'nosuch'" in p.stderr


def test_postmap_texthash_and_other_types(instance):
    path = write(instance, "access", "client.example OK\n")
    p = cmd(instance, "postmap", f"texthash:{path}")
    assert p.returncode == 0
    assert p.stderr == f"postmap: texthash:{path}: nothing to build (texthash tables are read directly)\n"
    assert not os.path.exists(path + ".db")
    assert cmd(instance, "postmap", "-q", "CLIENT.example", f"texthash:{path}").stdout == "OK\n"
    assert cmd(instance, "postmap", "-q", "b", "inline:{ a=1, b=2 }").stdout == "2\n"
    assert cmd(instance, "postmap", "-q", "any", "static:REJECT").stdout == "REJECT\n"


def test_postalias(instance):
    path = write(instance, "aliases2", "postmaster: root\nstaff: alice,\n  bob, \"|/bin/cat\"\n"
                                       "\"with space\": carol\n")
    cmd(instance, "postalias", path)
    assert cmd(instance, "postalias", "-q", "STAFF", path).stdout == 'alice, bob, "|/bin/cat"\n'
    assert cmd(instance, "postalias", "-q", "with space", path).stdout == "carol\n"
    assert cmd(instance, "postalias", "-q", "nobody", path, check=False).returncode == 1
    write(instance, "aliases2", "postmaster root\n")
    p = cmd(instance, "postalias", path, check=False)
    assert p.returncode == 1
    assert p.stderr == f"postalias: fatal: {path}:1: expected format: name: value (got 'postmaster root')\n"


def test_newaliases(instance):
    aliases = os.path.join(instance.etc, "aliases")
    p = cmd(instance, "newaliases")
    assert p.stderr == (f"newaliases: texthash:{aliases}: nothing to build "
                        "(texthash tables are read directly)\n")
    assert cmd(instance, "postalias", "-q", "abuse", f"texthash:{aliases}").stdout == "postmaster\n"
    instance.postconf_e(alias_database="hash:$config_directory/aliases")
    p = cmd(instance, "newaliases")
    assert p.stderr == ""
    assert cmd(instance, "postalias", "-q", "MAILER-DAEMON", f"hash:{aliases}").stdout == "postmaster\n"
    with open(aliases, "a") as f:
        f.write("broken line\n")
    p = cmd(instance, "newaliases", check=False)
    assert p.returncode == 1
    assert p.stderr.startswith(f"newaliases: fatal: {aliases}:")
    assert "expected format: name: value" in p.stderr
    assert cmd(instance, "postalias", "-q", "abuse", f"hash:{aliases}").stdout == "postmaster\n"
    p = run([os.path.join(BIN, "sendmail"), "-c", instance.etc, "-bi"], check=False)
    assert p.returncode == 1 and "expected format: name: value" in p.stderr
