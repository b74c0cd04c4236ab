"""postconf - pymta configuration utility (Postfix's postconf)

SYNOPSIS
    postconf [-dfhnx] [-c config_dir] [-o name=value] [parameter ...]
    postconf [-e] [-c config_dir] name=value ...
    postconf -X [-c config_dir] parameter ...
    postconf -M [-fx] [-c config_dir] [service[/type] ...]
    postconf -P [-fhx] [-c config_dir] [service[/type[/parameter]] ...]

DESCRIPTION
    Without options, prints every main.cf parameter as `name = value`, sorted
    by name, with $name references left as written (-x expands them).  Named
    parameters are printed in the order given; an unknown name gets
    "postconf: warning: NAME: unknown parameter" (exit status 0, as Postfix).
    -n   only the parameters set in main.cf (and by -o)
    -d   the built-in defaults instead of the actual settings
    -h   values only, without "name = "
    -x   expand $name, ${name}, $(name), ${name?text}, ${name:text}
    -f   fold long lines at 80 columns, as Postfix does
    -o   name=value: override a main.cf setting for this run
    -e   set name=value in main.cf: an existing setting (with its
         continuation lines) is replaced where it is, a new one appended;
         comments, blank lines and order are kept.  -e is implied when every
         argument has an "=".
    -X   remove the named settings from main.cf
    -M   print master.cf services (all, or service and service/type, "*"
         matches any), one line each; -Mf puts each -o on its own line
    -P   print master.cf -o settings as service/type/name = value
    -c   the config directory (else $MAIL_CONFIG, else /etc/pymta)
    The whole configuration is validated whenever it is read: a mistake ends
    the run with "postconf: fatal: FILE:LINE: reason" and exit status 1.
    -e and -X write main.cf atomically (temporary file, fsync, rename, fsync
    of the directory) under an exclusive lock, and only when the result is
    valid.  `postconf --doc-markdown` prints docs/parameters.md.

READS, WRITES
    $config_directory/main.cf (read; rewritten by -e and -X, keeping its mode
    and owner), $config_directory/master.cf (read).
SOCKETS
    None.
SECURITY
    Runs with the privileges of its caller; no set-id.  main.cf and
    master.cf are trusted (their owner can already run the mail system), but
    their contents are still parsed strictly.  Values given to -e must be
    one line, so a value cannot inject further settings.
PARAMETERS
    Every parameter in pymta/core/params.py; config_directory.
SEE ALSO
    pymta check, docs/parameters.md, Postfix postconf(1), postconf(5).
"""

import fcntl
import os
import re
import signal
import tempfile

import click

from pymta.core import config, log
from pymta.core.check import validate_master
from pymta.core.errors import ConfigError
from pymta.core.params import PARAMS

LINE_LIMIT = 80
INDENT = "    "
# Where Postfix's `postconf -M` puts the eight master.cf columns.
COLUMN_GOALS = (0, 11, 17, 25, 33, 41, 49, 57)
_NAME_RE = re.compile(r"[A-Za-z0-9_]+\Z")
_WORD_SEP = re.compile(r"[ \t\r\n]+")


# --- output ---------------------------------------------------------------------


def format_line(text, fold=False):
    """Postfix's pcf_print_line(): words separated by one space; with fold,
    a word that would reach column 80 starts a new line indented by four."""
    out, line_len = [], 0
    for word in _WORD_SEP.split(text):
        if not word:
            continue
        if line_len > 0:
            if not fold or line_len + len(word) < LINE_LIMIT:
                out.append(" ")
                line_len += 1
            else:
                out.append("\n" + INDENT)
                line_len = len(INDENT)
        out.append(word)
        line_len += len(word)
    return "".join(out) + "\n"


def format_param(name, value, hide_name=False, fold=False):
    return format_line(value if hide_name else f"{name} = {value}", fold)


def master_arguments(entry):
    """The arguments after the command, with `-oname=value` split like
    `-o name=value`: [(argument, value-or-None)]."""
    tokens = entry.text.split()[8:]
    out, i = [], 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "-o" and i + 1 < len(tokens):
            out.append(("-o", tokens[i + 1]))
            i += 2
        elif tok.startswith("-o") and len(tok) > 2:
            out.append(("-o", tok[2:]))
            i += 1
        else:
            out.append((tok, None))
            i += 1
    return out


def format_master_entry(entry, fold=False, expand=None):
    """One master.cf service as Postfix's `postconf -M` prints it: the eight
    columns at their usual positions, then the arguments; with fold, each
    `-o name=value` starts a line of its own.  `expand(name)`, when given,
    is the value to print for an -o setting of `name`."""
    parts, line_len = [], 0
    for goal, column in zip(COLUMN_GOALS, entry.text.split()[:8]):
        if line_len > 0:
            parts.append(" ")
            line_len += 1
            while line_len < goal:
                parts.append(" ")
                line_len += 1
        parts.append(column)
        line_len += len(column)
    in_options = True
    for arg, value in master_arguments(entry):
        arg_len = len(arg)
        if in_options:
            if not arg.startswith("-") or arg == "--":
                in_options = False
            elif value is not None:
                line_len = LINE_LIMIT       # with fold, an -o setting starts a line
                name, sep, _ = value.partition("=")
                if expand is not None and sep:
                    value = f"{name}={expand(name)}"
                arg_len += 1 + len(value)
        if line_len > len(INDENT):
            if not fold or line_len + 1 + arg_len < LINE_LIMIT:
                parts.append(" ")
                line_len += 1
            else:
                parts.append("\n" + INDENT)
                line_len = len(INDENT)
        parts.append(arg)
        line_len += len(arg)
        if value is not None:
            parts.append(" " + value)
            line_len = LINE_LIMIT           # and the argument after it too
    return "".join(parts) + "\n"


def params_markdown():
    """docs/parameters.md, generated from params.py."""
    out = [
        "# pymta configuration parameters",
        "",
        "<!-- Generated from pymta/core/params.py by `postconf --doc-markdown`;"
        " do not edit. -->",
        "",
        "Every parameter that `main.cf` may set, or a `master.cf` line may",
        "override with `-o name=value`.  `postconf -d` prints the defaults,",
        "`postconf -n` what an instance sets, and `postconf -x` the values with",
        "`$name` expanded.  A name that is not listed here is a mistake (unless",
        "another value refers to it as `$name`), reported with file and line.",
        "",
        "| type | value |",
        "|---|---|",
        "| str | text; `$name`, `${name}`, `$(name)`, `${name?text}`, `${name:text}` expand |",
        "| int | a decimal number, 0 or more |",
        "| bool | `yes` or `no` (also `true`/`false`, `on`/`off`, `1`/`0`) |",
        "| time | a number with an optional unit `s`, `m`, `h`, `d` or `w` "
        "(the default unit is given when it is not seconds) |",
        "| size | a number of bytes |",
        "| list | items separated by commas and/or white space |",
        "",
    ]
    for name in sorted(PARAMS):
        param = PARAMS[name]
        type_text = param.type
        if param.type == "time" and param.unit != "s":
            type_text += f" (default unit: {param.unit})"
        default = f"`{param.default}`" if param.default else "(empty)"
        out += [f"## {name}", "", _markdown_text(param.doc), "",
                f"- type: {type_text}", f"- default: {default}", ""]
    return "\n".join(out)


def _markdown_text(text):
    return re.sub(r"([\\`*<])", r"\\\1", text)


# --- loading ------------------------------------------------------------------------


def _parse_setting(arg, option):
    name, sep, value = arg.partition("=")
    name, value = name.strip(), value.strip()
    if not sep or not _NAME_RE.match(name):
        log.fatal(f"{option} {arg}: use {option} name=value")
    if any(c in value for c in "\n\r\0"):
        log.fatal(f"{option} {name}: the value must be one line")
    return name, value


def _load(config_dir, overrides, need_master):
    """main.cf and master.cf, both validated; a mistake is fatal."""
    try:
        cfg = config.load(config_dir, overrides)
    except ConfigError as e:
        log.fatal(str(e))
    master_cf = os.path.join(config_dir, "master.cf")
    if not need_master and not os.path.exists(master_cf):
        log.warning(f"{master_cf}: file not found")
        return cfg, []
    try:
        entries = config.load_master(config_dir)
        validate_master(cfg, entries)
    except ConfigError as e:
        log.fatal(str(e))
    return cfg, entries


def _service_config(cfg, entry):
    """main.cf with the -o settings of one master.cf service."""
    explicit = dict(cfg.explicit)
    for name, value in entry.overrides.items():
        explicit[name] = (value, entry.file, entry.line)
    return config.MainConfig(cfg.config_dir, explicit)


# --- main.cf display ----------------------------------------------------------------


def show_main(config_dir, overrides, names, defaults, nondefault, hide_name, expand, fold):
    if defaults:
        cfg = config.MainConfig(config_dir, {})
        known = set(PARAMS)
    else:
        cfg, _ = _load(config_dir, overrides, need_master=False)
        known = set(PARAMS) | set(cfg.explicit)
    if names:
        selected = []
        for name in names:
            if name not in known:
                log.warning(f"{name}: unknown parameter")
            elif not nondefault or name in cfg.explicit:
                selected.append(name)
    elif nondefault:
        selected = sorted(cfg.explicit)
    else:
        selected = sorted(known)
    out = []
    for name in selected:
        value = cfg.get_str(name) if expand else cfg.raw(name)
        out.append(format_param(name, value, hide_name, fold))
    click.echo("".join(out), nl=False)


# --- master.cf display ---------------------------------------------------------------


def _split_filter(arg, most, usage):
    fields = arg.split("/")
    if len(fields) > most or not all(fields):
        log.fatal(usage)
    return fields + ["*"] * (most - len(fields))


def _match(pattern, value):
    return pattern == "*" or pattern == value


def show_master(config_dir, overrides, filters, expand, fold):
    cfg, entries = _load(config_dir, overrides, need_master=True)
    patterns = [_split_filter(f, 2, "-M option requires service_name[/type]") for f in filters]
    used = set()
    out = []
    for entry in entries:
        hits = [i for i, (name, stype) in enumerate(patterns)
                if _match(name, entry.name) and _match(stype, entry.type)]
        if patterns and not hits:
            continue
        used.update(hits)
        expander = _service_config(cfg, entry).get_str if expand else None
        out.append(format_master_entry(entry, fold, expander))
    for i, arg in enumerate(filters):
        if i not in used:
            log.warning(f'unmatched request: "{arg}"')
    click.echo("".join(out), nl=False)


def show_master_params(config_dir, overrides, filters, hide_name, expand, fold):
    for arg in filters:
        if "=" in arg:
            log.fatal(f"{arg}: postconf -P does not edit master.cf; edit the file and run pymta check")
    cfg, entries = _load(config_dir, overrides, need_master=True)
    patterns = [_split_filter(f, 3, "-P option requires service_name[/type[/parameter]]") for f in filters]
    used = set()
    out = []
    for entry in entries:
        scfg = _service_config(cfg, entry) if expand else None
        for name in sorted(entry.overrides):
            hits = [i for i, (service, stype, param) in enumerate(patterns)
                    if _match(service, entry.name) and _match(stype, entry.type) and _match(param, name)]
            if patterns and not hits:
                continue
            used.update(hits)
            value = scfg.get_str(name) if expand else entry.overrides[name]
            out.append(format_param(f"{entry.name}/{entry.type}/{name}", value, hide_name, fold))
    for i, arg in enumerate(filters):
        if i not in used:
            log.warning(f'unmatched request: "{arg}"')
    click.echo("".join(out), nl=False)


# --- main.cf editing -----------------------------------------------------------------


def edit_text(text, settings, removals):
    """main.cf text with `settings` ({name: value}) replaced or appended and
    `removals` removed.  A setting is its logical line: the `name = value`
    line and the continuation lines after it (comment and blank lines in
    between stay, as in Postfix).  Every occurrence of a name is replaced."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    out, found, editing = [], set(), False
    for line in lines:
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            out.append(line)
        elif line[0] in " \t":
            if not editing:
                out.append(line)
        else:
            name = line.partition("=")[0].strip()
            editing = name in settings or name in removals
            if name in settings:
                out.append(f"{name} = {settings[name]}".rstrip())
                found.add(name)
            elif not editing:
                out.append(line)
    for name, value in settings.items():
        if name not in found:
            out.append(f"{name} = {value}".rstrip())
    return "".join(line + "\n" for line in out)


def _open_locked(path):
    """An fd of `path` under an exclusive lock, re-opened when another
    postconf replaced the file while we waited for the lock."""
    while True:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            log.fatal(f"{path}: file not found")
        except OSError as e:
            log.fatal(f"{path}: {e.strerror}")
        fcntl.flock(fd, fcntl.LOCK_EX)
        held = os.fstat(fd)
        try:
            now = os.stat(path)
        except FileNotFoundError:
            now = None
        if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            return fd, held
        os.close(fd)


def _read_fd(fd):
    chunks = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _validate_new_main_cf(config_dir, main_cf, tmp):
    """Validate the rewritten file; errors name main.cf and the line as it
    would be after the edit."""
    try:
        explicit = config.parse_main_cf(tmp)
    except ConfigError as e:
        raise ConfigError(main_cf, e.line, e.reason) from None
    explicit = {name: (value, main_cf, line) for name, (value, _, line) in explicit.items()}
    config.MainConfig(config_dir, explicit).validate()


def edit_main_cf(config_dir, settings, removals):
    """Apply an edit to main.cf: temporary file, fsync, validate, rename,
    fsync the directory.  main.cf is left untouched on any error."""
    main_cf = os.path.join(config_dir, "main.cf")
    fd, st = _open_locked(main_cf)
    tmp = None
    try:
        try:
            text = _read_fd(fd).decode("utf-8")
        except UnicodeDecodeError as e:
            log.fatal(f"{main_cf}: not valid UTF-8 ({e.reason})")
        new_text = edit_text(text, settings, removals)
        tmp_fd, tmp = tempfile.mkstemp(prefix=".main.cf.", dir=config_dir)
        with os.fdopen(tmp_fd, "w", encoding="utf-8") as f:
            f.write(new_text)
            f.flush()
            os.fchmod(f.fileno(), st.st_mode & 0o7777)
            if os.geteuid() == 0:
                os.fchown(f.fileno(), st.st_uid, st.st_gid)
            os.fsync(f.fileno())
        try:
            _validate_new_main_cf(config_dir, main_cf, tmp)
        except ConfigError as e:
            log.fatal(f"{e} ({main_cf} not changed)")
        os.rename(tmp, main_cf)
        tmp = None
        dir_fd = os.open(config_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        log.fatal(f"{main_cf}: cannot rewrite: {e.strerror}")
    finally:
        if tmp is not None:
            os.unlink(tmp)
        os.close(fd)


# --- command line --------------------------------------------------------------------


@click.command(context_settings={"help_option_names": ["--help"]})
@click.option("-c", "config_dir", metavar="DIR", help="Config directory (else $MAIL_CONFIG, else /etc/pymta).")
@click.option("-d", "defaults", is_flag=True, help="Print default settings.")
@click.option("-n", "nondefault", is_flag=True, help="Print only settings made in main.cf.")
@click.option("-h", "hide_name", is_flag=True, help="Print values only.")
@click.option("-x", "expand", is_flag=True, help="Expand $name in values.")
@click.option("-f", "fold", is_flag=True, help="Fold long lines.")
@click.option("-e", "edit", is_flag=True, help="Edit main.cf: name=value ...")
@click.option("-X", "remove", is_flag=True, help="Remove settings from main.cf: name ...")
@click.option("-M", "master", is_flag=True, help="Print master.cf services.")
@click.option("-P", "master_params", is_flag=True, help="Print master.cf -o settings.")
@click.option("-o", "overrides", multiple=True, metavar="NAME=VALUE", help="Override a main.cf setting for this run.")
@click.option("--doc-markdown", is_flag=True, hidden=True)
@click.argument("args", nargs=-1)
def postconf(config_dir, defaults, nondefault, hide_name, expand, fold, edit, remove,
             master, master_params, overrides, doc_markdown, args):
    """Print or change pymta's configuration (Postfix's postconf)."""
    if doc_markdown:
        click.echo(params_markdown(), nl=False)
        return
    config_dir = config.find_config_dir(config_dir)
    modes = [flag for flag, on in (("-e", edit), ("-X", remove), ("-M", master), ("-P", master_params)) if on]
    if not modes and args and any("=" in arg for arg in args):
        modes = ["-e"]      # Postfix 2.8 and later: -e is implied by name=value
    selectors = [flag for flag, on in (("-d", defaults), ("-n", nondefault)) if on]
    if len(modes) > 1 or len(selectors) > 1 or (modes and selectors):
        log.fatal("specify one of " + " ".join((modes + selectors)[:2]))
    settings = dict(_parse_setting(o, "-o") for o in overrides)
    mode = modes[0] if modes else None
    if mode == "-e":
        if not args:
            log.fatal("-e requires name=value arguments")
        edit_main_cf(config_dir, dict(_parse_setting(arg, "-e") for arg in args), set())
    elif mode == "-X":
        if not args:
            log.fatal("-X requires parameter names")
        for arg in args:
            if not _NAME_RE.match(arg):
                log.fatal(f"-X {arg}: not a parameter name")
        edit_main_cf(config_dir, {}, set(args))
    elif mode == "-M":
        show_master(config_dir, settings, args, expand, fold)
    elif mode == "-P":
        show_master_params(config_dir, settings, args, hide_name, expand, fold)
    else:
        show_main(config_dir, settings, args, defaults, nondefault, hide_name, expand, fold)


def main(argv=None):
    # Die quietly on a closed pipe (postconf | head), as a C program does.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    log.setup("postconf", tag="postconf")
    try:
        return postconf.main(args=argv, prog_name="postconf", standalone_mode=False) or 0
    except click.UsageError as e:
        log.fatal(f"usage: {e.format_message()}")
