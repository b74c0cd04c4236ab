"""Lookup tables: texthash, hash (sqlite, built by build_table), inline,
static, passwd-file; both source syntaxes; Postfix's address lookup order."""

import os
import sqlite3
import stat
import time

import pytest

from pymta.core import tables
from pymta.core.errors import ConfigError
from pymta.core.tables import (
    build_table, lookup_address, lookup_tables, open_table, parse_source,
    split_addresses, split_table_list,
)


def write(path, text, mode=None):
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    if mode is not None:
        os.chmod(path, mode)
    return str(path)


def touch_later(path):
    """Make sure a rewrite is seen as a change even within one mtime tick."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


# -- source syntax ----------------------------------------------------------------

def test_postmap_syntax_comments_continuations_and_case():
    src = (b"# a comment\n"
           b"\n"
           b"Alice@Example.ORG   bob@example.org\n"
           b"   # comment inside does not end the entry\n"
           b"list@example.org  a@example.org,\n"
           b"    b@example.org\n"
           b"key\tvalue with  inner   spaces  \n")
    parsed = parse_source(src, "/t")
    assert parsed.entries == {
        "alice@example.org": "bob@example.org",
        "list@example.org": "a@example.org, b@example.org",
        "key": "value with  inner   spaces",
    }
    assert parsed.warnings == []


def test_duplicate_keys_keep_the_first_and_warn():
    parsed = parse_source(b"a 1\nA 2\n", "/t")
    assert parsed.entries == {"a": "1"}
    assert parsed.warnings == ["/t:2: duplicate entry 'A' ignored (first on line 1)"]


@pytest.mark.parametrize("src,line,text", [
    (b"ok value\nlonely\n", 2, "expected format: key whitespace value"),
    (b"  continued first\n", 1, "continuation line without an entry"),
    (b"a b\n\xff\xfe x\n", 2, "not valid UTF-8"),
    (b"a b\nc\0 d\n", 2, "NUL character"),
])
def test_postmap_syntax_errors_name_file_and_line(src, line, text):
    with pytest.raises(ConfigError) as e:
        parse_source(src, "/etc/x")
    assert e.value.file == "/etc/x" and e.value.line == line
    assert text in str(e.value)
    assert str(e.value).startswith(f"/etc/x:{line}: ")


def test_aliases_syntax():
    src = (b"# RFC 2142\n"
           b"postmaster: root\n"
           b"Staff: alice,\n"
           b"\tbob, \"|/usr/bin/logger -t mail\"\n"
           b"\"with space\": carol\n"
           b"\"q\\\"uote\" : dave\n"
           b"team :eve\n")
    parsed = parse_source(src, "/etc/aliases", aliases=True)
    assert parsed.entries == {
        "postmaster": "root",
        "staff": 'alice, bob, "|/usr/bin/logger -t mail"',
        "with space": "carol",
        'q"uote': "dave",
        "team": "eve",
    }


@pytest.mark.parametrize("src,line,text", [
    (b"root: a\nnocolon here\n", 2, "expected format: name: value"),
    (b"empty:\n", 1, "has no value"),
    (b"a b: c\n", 1, "white space in alias name"),
    (b"\"open: x\n", 1, "unterminated quoted alias name"),
    (b": x\n", 1, "empty alias name"),
])
def test_aliases_syntax_errors(src, line, text):
    with pytest.raises(ConfigError) as e:
        parse_source(src, "/etc/aliases", aliases=True)
    assert (e.value.file, e.value.line) == ("/etc/aliases", line)
    assert text in e.value.reason


def test_overlong_entry_is_refused(monkeypatch):
    monkeypatch.setattr(tables, "MAX_LINE", 100)
    with pytest.raises(ConfigError) as e:
        parse_source(b"k " + b"v" * 200 + b"\n", "/t")
    assert e.value.line == 1 and "longer than 100" in e.value.reason


# -- texthash -----------------------------------------------------------------------

def test_texthash_reads_the_file_and_sees_changes(tmp_path):
    path = write(tmp_path / "map", "a@x one\n")
    t = open_table(f"texthash:{path}")
    assert t.lookup("A@X") == "one"
    assert t.lookup("b@x") is None
    write(tmp_path / "map", "a@x two\nb@x three\n")
    touch_later(path)
    assert t.lookup("a@x") == "two"
    assert t.lookup("b@x") == "three"
    assert open_table(f"texthash:{path}") is t


def test_texthash_errors_are_config_errors(tmp_path):
    t = open_table(f"texthash:{tmp_path}/missing")
    with pytest.raises(ConfigError) as e:
        t.lookup("x")
    assert e.value.file == f"{tmp_path}/missing"
    path = write(tmp_path / "bad", "good one\nbad\n")
    with pytest.raises(ConfigError) as e:
        open_table(f"texthash:{path}").lookup("good")
    assert (e.value.file, e.value.line) == (path, 2)


def test_texthash_aliases_flag_selects_the_syntax(tmp_path):
    path = write(tmp_path / "aliases", "root: alice, bob\n")
    assert open_table(f"texthash:{path}", aliases=True).lookup("ROOT") == "alice, bob"
    # The same file in postmap syntax: the key is "root:".
    assert open_table(f"texthash:{path}").lookup("root:") == "alice, bob"
    assert open_table(f"texthash:{path}").lookup("root") is None


# -- hash (sqlite) ------------------------------------------------------------------

def test_hash_build_and_lookup(tmp_path):
    path = write(tmp_path / "virtual", "Sales@Example.org  alice@example.org\n@example.net bob\n",
                 mode=0o640)
    result = build_table(f"hash:{path}")
    assert result.db_path == path + ".db" and result.entries == 2
    st = os.stat(result.db_path)
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert sorted(os.listdir(tmp_path)) == ["virtual", "virtual.db"]
    t = open_table(f"hash:{path}")
    assert t.lookup("sales@EXAMPLE.org") == "alice@example.org"
    assert t.lookup("@example.net") == "bob"
    assert t.lookup("nobody") is None
    with sqlite3.connect(result.db_path) as conn:
        assert conn.execute("SELECT value FROM meta WHERE name='format'").fetchone()[0] == tables.DB_FORMAT


def test_hash_rebuild_is_seen_by_open_tables(tmp_path):
    path = write(tmp_path / "m", "k old\n")
    build_table(f"hash:{path}")
    t = open_table(f"hash:{path}")
    assert t.lookup("k") == "old"
    write(tmp_path / "m", "k new\nk2 v\n")
    time.sleep(0.01)
    build_table(f"hash:{path}")
    assert t.lookup("k") == "new" and t.lookup("k2") == "v"


def test_hash_without_db_or_with_a_broken_one(tmp_path):
    path = write(tmp_path / "m", "k v\n")
    t = open_table(f"hash:{path}")
    with pytest.raises(ConfigError) as e:
        t.lookup("k")
    assert e.value.file == path + ".db" and "postmap" in e.value.reason
    write(tmp_path / "m.db", b"this is not sqlite at all" * 100)
    with pytest.raises(ConfigError) as e:
        t.lookup("k")
    assert "rebuild" in e.value.reason


def test_failed_build_keeps_the_old_db_and_leaves_no_temp_file(tmp_path):
    path = write(tmp_path / "m", "k v\n")
    build_table(f"hash:{path}")
    write(tmp_path / "m", "k v\nbroken\n")
    with pytest.raises(ConfigError) as e:
        build_table(f"hash:{path}")
    assert e.value.line == 2
    assert sorted(os.listdir(tmp_path)) == ["m", "m.db"]
    assert open_table(f"hash:{path}").lookup("k") == "v"


def test_build_of_aliases_and_of_types_without_a_db(tmp_path):
    path = write(tmp_path / "aliases", "postmaster: root\nstaff: a,\n  b\n")
    assert build_table(f"hash:{path}", aliases=True).entries == 2
    assert open_table(f"hash:{path}", aliases=True).lookup("staff") == "a, b"
    assert build_table(f"texthash:{path}") is None
    assert build_table("inline:{a=b}") is None


def test_build_without_type_means_hash(tmp_path):
    path = write(tmp_path / "m", "k v\n")
    assert build_table(path).db_path == path + ".db"


# -- inline, static, passwd-file ------------------------------------------------------

def test_inline_and_static():
    t = open_table("inline:{ a=1, B=2 , { c = with spaces, and commas }, d=}")
    assert t.lookup("A") == "1"
    assert t.lookup("b") == "2"
    assert t.lookup("c") == "with spaces, and commas"
    assert t.lookup("d") == ""
    assert t.lookup("e") is None
    assert open_table("static:OK").lookup("anything") == "OK"
    assert open_table("static:{ two words }").lookup("x") == "two words"


@pytest.mark.parametrize("spec", ["inline:a=b", "inline:{ a=b", "inline:{ novalue }",
                                  "nosuch:x", "texthash:", "noprefix"])
def test_bad_specs(spec):
    with pytest.raises(ConfigError):
        open_table(spec)


def test_relative_file_names_need_a_config_directory(tmp_path):
    with pytest.raises(ConfigError):
        open_table("texthash:relative/path")


def test_passwd_file(tmp_path):
    path = write(tmp_path / "users",
                 "Alice@Example.org:{PLAIN}secret::::::\nbob@example.org:{PLAIN}x::::::\n",
                 mode=0o600)
    t = open_table(f"passwd-file:{path}")
    assert t.lookup("alice@example.ORG") == "Alice@Example.org"
    assert t.lookup("carol@example.org") is None
    assert t.lookup("alice") is None
    os.unlink(path)
    with pytest.raises(ConfigError) as e:
        t.lookup("bob@example.org")
    assert e.value.file == path


def test_lookup_tables_takes_the_first_match(tmp_path):
    a = open_table("inline:{ k=first }")
    b = open_table("inline:{ k=second, only=b }")
    assert lookup_tables([a, b], "k") == "first"
    assert lookup_tables([a, b], "only") == "b"
    assert lookup_tables(["inline:{ x=y }"], "x") == "y"
    assert lookup_tables([a, b], "none") is None


# -- parameter values and result lists ------------------------------------------------

def test_split_table_list_keeps_braces():
    assert split_table_list("texthash:/a, hash:/b inline:{ a=b, { c = d e } },static:x") == [
        "texthash:/a", "hash:/b", "inline:{ a=b, { c = d e } }", "static:x"]
    assert split_table_list("") == []
    with pytest.raises(ConfigError):
        split_table_list("inline:{ a=b")


def test_split_addresses():
    assert split_addresses('a@x,b@y , "|cmd a, b", /file,,') == [
        "a@x", "b@y", '"|cmd a, b"', "/file"]
    assert split_addresses("") == []


# -- the address lookup order ----------------------------------------------------------

def test_lookup_address_order():
    t = open_table("inline:{ user+ext@d.example=full, user@d.example=noext, "
                   "user+ext=local-ext, user=local, @d.example=catchall }")
    assert lookup_address([t], "user+ext@d.example", "+") == "full"
    assert lookup_address([t], "user+other@d.example", "+") == "noext"
    assert lookup_address([t], "someone@d.example", "+") == "catchall"
    local_only = open_table("inline:{ user+ext=local-ext, user=local }")
    assert lookup_address([local_only], "user+ext@host.example", "+") == "local-ext"
    assert lookup_address([local_only], "user+zz@host.example", "+") == "local"
    # The bare user forms only for local domains when those are given.
    assert lookup_address([local_only], "user@remote.example", "+",
                          local_domains={"host.example"}) is None
    assert lookup_address([local_only], "user@HOST.example", "+",
                          local_domains={"host.example"}) == "local"
    assert lookup_address([local_only], "user", "+") == "local"
    # No delimiter: the extension is part of the name.
    assert lookup_address([t], "user+other@d.example", "") == "catchall"


def test_lookup_address_tries_each_form_in_every_table_first():
    first = open_table("inline:{ @d.example=from-first }")
    second = open_table("inline:{ x@d.example=from-second }")
    assert lookup_address([first, second], "x@d.example") == "from-second"


def test_lookup_address_rewrites_domains_and_propagates_extensions():
    t = open_table("inline:{ @old.example=@new.example, { list@d.example = a@d.example, b@d.example } }")
    assert lookup_address([t], "joe+x@old.example", "+") == "joe+x@new.example"
    assert lookup_address([t], "list+tag@d.example", "+") == "a@d.example, b@d.example"
    assert lookup_address([t], "list+tag@d.example", "+", propagate_extension=True) == \
        "a+tag@d.example, b+tag@d.example"
    assert lookup_address([t], "list@d.example", "+", propagate_extension=True) == \
        "a@d.example, b@d.example"


def test_lookup_address_with_several_delimiters():
    t = open_table("inline:{ joe@d.example=found }")
    assert lookup_address([t], "joe-x@d.example", "+-") == "found"
    assert lookup_address([t], "joe+x@d.example", "+-") == "found"
    assert lookup_address([t], "+joe@d.example", "+") is None
