"""postmap - build or query a lookup table (Postfix's postmap)

SYNOPSIS
    postmap [-fsv] [-c config_dir] [-q key] [type:]file ...

DESCRIPTION
    Without -q or -s, builds the indexed form of each `hash:` table: the
    source file FILE (`key whitespace value` lines, `#` comments, lines
    starting with white space continue the entry) becomes FILE.db, a
    sqlite3 database (why sqlite: pymta/core/tables.py).  The new database
    is written under a temporary name beside it, fsynced and renamed over
    the old one, so programs using the table see the old or the new one,
    never a mixture; a source file with a mistake replaces nothing.  A
    name without a type means hash: (Postfix's default_database_type).
    `texthash:` tables (and inline:, static:, passwd-file:) are read
    directly: there is nothing to build, postmap says so and succeeds.
    -q key  look key up in the tables, in order, and print the first
            value; exit status 0 when found, 1 when not.  `-q -` reads keys
            from stdin, one per line, and prints `key<TAB>value` for each
            key found.
    -s      print every entry of the tables as `key<TAB>value`
    -f      do not lower-case keys when building (lookups still do)
    -v      more output
    -c      the config directory (else $MAIL_CONFIG, else /etc/pymta):
            relative table names and $name in them use it
    Mistakes end the run with "postmap: fatal: FILE:LINE: reason" and exit
    status 1; duplicate keys are warnings (the first one counts).  Other
    Postfix options (-d, -i) are not supported and are usage errors.

READS, WRITES
    The source files (read), FILE.db (written, with the source's mode and,
    as root, its owner).
SOCKETS
    None.
SECURITY
    Runs with the privileges of its caller; no set-id.  Source files are
    parsed with length limits; keys and values are stored as data.
PARAMETERS
    config_directory (for relative names and $name in table names).
SEE ALSO
    postalias, newaliases, pymta/core/tables.py, Postfix postmap(1).
"""

import getopt
import os
import signal
import sys

from pymta.core import config
from pymta.core.errors import ConfigError
from pymta.core.tables import (
    DEFAULT_TYPE, build_and_report, open_table, split_spec,
)

FILE_TYPES = ("hash", "texthash", "passwd-file")
USAGE = "usage: {prog} [-fsv] [-c config_dir] [-q key] [type:]file ..."


class Fatal(Exception):
    """Ends the run: the message goes to stderr after "PROG: fatal: "."""


def load_config(config_dir):
    """The configuration when one is there (or asked for with -c), else None."""
    if config_dir is None and not os.environ.get("MAIL_CONFIG") and not os.path.exists(
            os.path.join(config.DEFAULT_CONFIG_DIRECTORY, "main.cf")):
        return None
    try:
        return config.load(config_dir)
    except ConfigError as e:
        raise Fatal(str(e)) from None


def full_spec(name):
    """type:name with the default type, and a file name relative to the
    current directory made absolute (as Postfix's postmap reads it)."""
    spec = name if ":" in name else f"{DEFAULT_TYPE}:{name}"
    kind, path = split_spec(spec)
    if kind in FILE_TYPES and not path.startswith("$") and not os.path.isabs(path):
        spec = f"{kind}:{os.path.abspath(path)}"
    return spec


def query(prog, specs, key, cfg, aliases, out):
    tables = [open_table(s, cfg, aliases) for s in specs]
    if key == "-":
        found = False
        for line in sys.stdin:
            k = line.rstrip("\n")
            if not k:
                continue
            for t in tables:
                value = t.lookup(k)
                if value is not None:
                    out.write(f"{k}\t{value}\n")
                    found = True
                    break
        return 0 if found else 1
    for t in tables:
        value = t.lookup(key)
        if value is not None:
            out.write(value + "\n")
            return 0
    return 1


def run(prog, argv, aliases):
    """postmap (aliases=False) and postalias (aliases=True)."""
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    out, err = sys.stdout, sys.stderr
    try:
        opts, args = getopt.getopt(argv, "bc:d:fhimnNopq:rsuvw")
    except getopt.GetoptError as e:
        err.write(f"{prog}: fatal: {e}; {USAGE.format(prog=prog)}\n")
        return 1
    config_dir = key = None
    dump, fold, verbose = False, True, False
    for opt, val in opts:
        if opt == "-c":
            config_dir = val
        elif opt == "-q":
            key = val
        elif opt == "-s":
            dump = True
        elif opt == "-f":
            fold = False
        elif opt == "-v":
            verbose = True
        elif opt in ("-d", "-i"):
            err.write(f"{prog}: fatal: option {opt} is not supported; {USAGE.format(prog=prog)}\n")
            return 1
    if not args:
        err.write(f"{prog}: fatal: {USAGE.format(prog=prog)}\n")
        return 1
    if key is not None and dump:
        err.write(f"{prog}: fatal: specify only one of -q and -s\n")
        return 1
    try:
        cfg = load_config(config_dir)
        specs = [full_spec(a) for a in args]
        if key is not None:
            return query(prog, specs, key, cfg, aliases, out)
        if dump:
            for spec in specs:
                for k, v in open_table(spec, cfg, aliases).items():
                    out.write(f"{k}\t{v}\n")
            return 0
        for spec in specs:
            build_and_report(spec, cfg, aliases, prog, err, verbose, fold=fold)
        return 0
    except (ConfigError, Fatal) as e:
        err.write(f"{prog}: fatal: {e}\n")
        return 1
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        err.write(f"{prog}: fatal: {where}{e.strerror or e}\n")
        return 1


def main(argv=None):
    return run("postmap", sys.argv[1:] if argv is None else argv, aliases=False)
