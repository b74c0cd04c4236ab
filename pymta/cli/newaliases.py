"""newaliases - rebuild the alias databases (Postfix's newaliases)

SYNOPSIS
    newaliases [-v] [-c config_dir]
    sendmail -bi [-oA table] [-C config_dir]

DESCRIPTION
    Builds the indexed form of every table in `alias_database`, as
    `postalias` does: each `hash:FILE` table's FILE.db is written under a
    temporary name, fsynced and renamed into place.  Tables that are read
    directly (texthash:, the default `texthash:$config_directory/aliases`)
    have nothing to build: newaliases says so and exits 0, and the alias
    file is in use as soon as it is saved.  A mistake in an alias file is
    reported as "newaliases: fatal: FILE:LINE: reason" (exit status 1) and
    leaves that table's database as it was.

READS, WRITES
    main.cf; the alias files (read), their .db files (written).
SOCKETS
    None.
SECURITY
    Runs with the privileges of its caller; no set-id.
PARAMETERS
    alias_database
SEE ALSO
    postalias, sendmail -bi, pymta/core/tables.py, Postfix newaliases(1).
"""

import getopt
import sys

from pymta.core import config
from pymta.core.errors import ConfigError
from pymta.core.tables import build_and_report, split_table_list


def rebuild(cfg, specs=None, prog="newaliases", verbose=False, err=None):
    """Build each alias table (default: alias_database); return the exit status."""
    err = err or sys.stderr
    try:
        if specs is None:
            specs = split_table_list(cfg.get_str("alias_database"))
        for spec in specs:
            build_and_report(spec, cfg, True, prog, err, verbose, noun="aliases")
    except ConfigError as e:
        err.write(f"{prog}: fatal: {e}\n")
        return 1
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        err.write(f"{prog}: fatal: {where}{e.strerror or e}\n")
        return 1
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts, args = getopt.getopt(argv, "c:v")
    except getopt.GetoptError as e:
        sys.stderr.write(f"newaliases: fatal: {e}; usage: newaliases [-v] [-c config_dir]\n")
        return 1
    if args:
        sys.stderr.write("newaliases: fatal: usage: newaliases [-v] [-c config_dir]\n")
        return 1
    config_dir, verbose = None, False
    for opt, val in opts:
        if opt == "-c":
            config_dir = val
        else:
            verbose = True
    try:
        cfg = config.load(config_dir)
    except ConfigError as e:
        sys.stderr.write(f"newaliases: fatal: {e}\n")
        return 1
    return rebuild(cfg, verbose=verbose)
