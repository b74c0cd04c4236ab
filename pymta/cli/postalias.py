"""postalias - build or query an alias table (Postfix's postalias)

SYNOPSIS
    postalias [-fsv] [-c config_dir] [-q key] [type:]file ...

DESCRIPTION
    postmap for alias files: the source syntax is that of aliases(5),

        # comment
        name: destination, destination, ...
        "quoted name": destination
            continuation lines start with white space

    where a destination is an address, a local name, |command, /file or
    :include:/path (the local delivery agent interprets them; postalias
    stores the text after the colon as written).  Options, exit status and
    output are those of postmap: building a `hash:` table writes FILE.db
    atomically; texthash: tables have nothing to build; -q looks a name
    up (exit status 0 found, 1 not found); -s lists the table.

READS, WRITES
    The alias file (read), FILE.db (written, with the source's mode and,
    as root, its owner).
SOCKETS
    None.
SECURITY
    Runs with the privileges of its caller; no set-id.  The file is parsed
    with length limits; |command and /file destinations are only stored
    here, never run.
PARAMETERS
    config_directory (for relative names and $name in table names).
SEE ALSO
    newaliases, postmap, pymta/core/tables.py, Postfix postalias(1).
"""

import sys

from pymta.cli.postmap import run


def main(argv=None):
    return run("postalias", sys.argv[1:] if argv is None else argv, aliases=True)
