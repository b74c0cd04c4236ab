"""Configuration in Postfix syntax: main.cf and master.cf.

main.cf: `name = value` lines; a line that starts with white space continues
the one before; lines whose first non-blank character is `#` are comments.
Values may refer to other parameters as `$name`, `${name}` or `$(name)`, and
conditionally as `${name?text}` (text when name is non-empty) and
`${name:text}` (text when name is empty).  Every parameter is declared in
params.py; a name that is neither declared nor referenced by another value is
an error, reported with file and line, as is a value of the wrong type.

master.cf: one service per logical line, eight columns
`service type private unpriv chroot wakeup maxproc command + args`, with
`-o name=value` arguments that override main.cf for that service.
"""

import os
import re
import socket
from dataclasses import dataclass, field

from pymta.core.errors import ConfigError
from pymta.core.params import PARAMS

DEFAULT_CONFIG_DIRECTORY = "/etc/pymta"

_NAME_RE = re.compile(r"[A-Za-z0-9_]+\Z")
_TIME_RE = re.compile(r"([0-9]+)([smhdw]?)\Z")
_TIME_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# Names that the local delivery agent expands per recipient (forward_path,
# mailbox_command); they stay literal when main.cf is read.
LOCAL_EXPANSIONS = {"user", "home", "shell", "recipient", "extension", "domain",
                    "local", "mailbox", "sender", "recipient_delimiter_char"}
_TRUE = {"yes", "true", "1", "on"}
_FALSE = {"no", "false", "0", "off"}


def find_config_dir(option=None):
    """The config directory: -c option, else $MAIL_CONFIG, else /etc/pymta."""
    path = option or os.environ.get("MAIL_CONFIG") or DEFAULT_CONFIG_DIRECTORY
    return os.path.abspath(path)


def logical_lines(path):
    """Yield (line_number, text) for each logical line of a Postfix-style file.

    A physical line that starts with white space continues the logical line
    before it; comment and blank lines are skipped (and do not end a logical
    line, as in Postfix)."""
    try:
        with open(path, encoding="utf-8", errors="strict") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(path, None, "file not found") from None
    except UnicodeDecodeError as e:
        raise ConfigError(path, None, f"not valid UTF-8 ({e.reason})") from None
    except OSError as e:
        raise ConfigError(path, None, e.strerror) from None
    start, text = None, None
    # Lines end at "\n" only: str.splitlines() would also split at form
    # feeds and Unicode separators and so misnumber every later line.
    for number, line in enumerate(raw.split("\n"), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0] in " \t":
            if text is None:
                raise ConfigError(path, number, "continuation line without a line before it")
            text += " " + stripped
            continue
        if text is not None:
            yield start, text
        start, text = number, stripped
    if text is not None:
        yield start, text


def parse_time(text, unit="s"):
    m = _TIME_RE.match(text.strip())
    if not m:
        raise ValueError(f"bad time value '{text}': use a number with an optional unit s, m, h, d or w")
    return int(m.group(1)) * _TIME_UNITS[m.group(2) or unit]


def parse_bool(text):
    t = text.strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise ValueError(f"bad boolean value '{text}': use yes or no")


def parse_list(text):
    return [item for item in re.split(r"[\s,]+", text.strip()) if item]


def _convert(param, text):
    if param.type == "str":
        return text
    if param.type == "list":
        return parse_list(text)
    if param.type == "bool":
        return parse_bool(text)
    if param.type == "time":
        return parse_time(text, param.unit)
    if param.type in ("int", "size"):
        t = text.strip()
        if not re.fullmatch(r"[0-9]+", t):
            raise ValueError(f"bad {'numerical' if param.type == 'int' else 'size'} value '{text}'")
        return int(t)
    raise ValueError(f"unknown parameter type {param.type}")


class MainConfig:
    """main.cf with defaults, expansion and typed access.

    `cfg.name` or `cfg["name"]` is the typed, expanded value; `cfg.raw(name)`
    is the text before expansion; `cfg.explicit` maps the names set in
    main.cf (or by overrides) to (value, file, line)."""

    def __init__(self, config_dir, explicit, overrides=None, override_source="-o"):
        self.config_dir = config_dir
        self.main_cf = os.path.join(config_dir, "main.cf")
        self.explicit = dict(explicit)
        for name, value in (overrides or {}).items():
            self.explicit[name] = (value, override_source, None)
        self._cache = {}

    def with_overrides(self, overrides, source="-o"):
        cfg = MainConfig(self.config_dir, self.explicit, overrides, source)
        cfg.validate()
        return cfg

    def raw(self, name):
        if name in self.explicit:
            return self.explicit[name][0]
        if name == "config_directory":
            return self.config_dir
        if name == "instance_directory":
            return os.path.dirname(self.config_dir.rstrip("/")) or "/"
        if name == "daemon_directory":
            return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "libexec"))
        if name in PARAMS:
            return PARAMS[name].default
        raise KeyError(name)

    def where(self, name):
        """(file, line) that set name, or (None, None) for a default."""
        if name in self.explicit:
            return self.explicit[name][1], self.explicit[name][2]
        return None, None

    def expand(self, text, _seen=()):
        """Expand $name, ${name}, $(name), ${name?x}, ${name:x} in text."""
        out = []
        i, n = 0, len(text)
        while i < n:
            c = text[i]
            if c != "$":
                j = text.find("$", i)
                j = n if j < 0 else j
                out.append(text[i:j])
                i = j
                continue
            if i + 1 >= n:
                out.append("$")
                break
            nxt = text[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
            elif nxt in "{(":
                close = "}" if nxt == "{" else ")"
                depth, j = 1, i + 2
                while j < n and depth:
                    if text[j] == nxt:
                        depth += 1
                    elif text[j] == close:
                        depth -= 1
                    j += 1
                if depth:
                    raise ValueError(f"unbalanced '{nxt}' in '{text}'")
                inner = text[i + 2:j - 1]
                m = re.match(r"([A-Za-z0-9_]+)(?:([?:])(.*))?\Z", inner, re.S)
                if not m:
                    raise ValueError(f"bad parameter reference '${nxt}{inner}{close}'")
                name, op, alt = m.group(1), m.group(2), m.group(3)
                if op and name in LOCAL_EXPANSIONS and not self._defined(name):
                    # Expanded per recipient by the local delivery agent:
                    # keep the whole conditional for it.
                    out.append(text[i:j])
                    i = j
                    continue
                # Conditional forms test whether a parameter is set, so an
                # undefined name is simply empty there, as in Postfix.
                value = self._lookup(name, _seen, optional=bool(op))
                if op == "?":
                    out.append(self.expand(alt, _seen) if value else "")
                elif op == ":":
                    out.append(value if value else self.expand(alt, _seen))
                else:
                    out.append(value)
                i = j
            else:
                m = re.match(r"[A-Za-z0-9_]+", text[i + 1:])
                if not m:
                    out.append("$")
                    i += 1
                    continue
                out.append(self._lookup(m.group(0), _seen))
                i += 1 + m.end()
        return "".join(out)

    def _defined(self, name):
        try:
            self.raw(name)
        except KeyError:
            return False
        return True

    def _lookup(self, name, seen, optional=False):
        if name in seen:
            raise ValueError(f"recursive reference to ${name}")
        try:
            raw = self.raw(name)
        except KeyError:
            if name in LOCAL_EXPANSIONS:
                return "$" + name
            if optional:
                return ""
            raise ValueError(f"reference to undefined parameter ${name}") from None
        return self.expand(raw, seen + (name,))

    def get_str(self, name):
        return self.expand(self.raw(name), (name,))

    def __getitem__(self, name):
        try:
            return self._cache[name]
        except KeyError:
            pass
        param = PARAMS.get(name)
        text = self.get_str(name)
        value = _convert(param, text) if param else text
        self._cache[name] = value
        return value

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def referenced_names(self):
        """Names used as $name in any explicit value (user-defined parameters)."""
        names = set()
        for value, _, _ in self.explicit.values():
            names.update(re.findall(r"\$\{?\(?([A-Za-z0-9_]+)", value))
        return names

    def validate(self):
        """Check every explicit value: known name, expandable, right type."""
        used = self.referenced_names()
        for name, (value, file, line) in self.explicit.items():
            if name not in PARAMS and name not in used:
                raise ConfigError(file, line, f"unknown parameter '{name}'")
            try:
                self._cache.pop(name, None)
                self[name]
            except ValueError as e:
                raise ConfigError(file, line, f"{name}: {e}") from None
        for name in PARAMS:
            try:
                self[name]
            except ValueError as e:
                file, line = self.where(name)
                raise ConfigError(file or self.main_cf, line, f"{name}: {e}") from None


def parse_main_cf(path):
    """Parse main.cf into {name: (value, file, line)}; syntax errors raise."""
    explicit = {}
    for number, text in logical_lines(path):
        name, sep, value = text.partition("=")
        name = name.strip()
        if not sep:
            raise ConfigError(path, number, f"missing '=' after parameter name '{name}'")
        if not _NAME_RE.match(name):
            raise ConfigError(path, number, f"bad parameter name '{name}'")
        if name == "config_directory":
            raise ConfigError(path, number, "config_directory cannot be set in main.cf; use -c or MAIL_CONFIG")
        explicit[name] = (value.strip(), path, number)
    return explicit


def load(config_dir=None, overrides=None, validate=True):
    """Read DIR/main.cf; return a validated MainConfig (ConfigError on mistakes)."""
    config_dir = find_config_dir(config_dir)
    path = os.path.join(config_dir, "main.cf")
    cfg = MainConfig(config_dir, parse_main_cf(path), overrides)
    if validate:
        cfg.validate()
    return cfg


# --- master.cf --------------------------------------------------------------

SERVICE_TYPES = ("inet", "unix")


@dataclass
class ServiceEntry:
    name: str               # "smtp", "127.0.0.1:2525", "pickup"
    type: str               # inet or unix
    private: bool
    unpriv: bool
    chroot: bool
    wakeup: int             # seconds, 0 = none
    wakeup_conditional: bool
    maxproc: int            # 0 = no limit
    command: str
    args: list
    overrides: dict = field(default_factory=dict)
    file: str = ""
    line: int = 0
    text: str = ""          # the logical line, to notice changes on reload
    host: str = ""          # inet: listen address ("" = inet_interfaces)
    port: int = 0           # inet: port

    @property
    def key(self):
        return (self.name, self.type)

    @property
    def service_name(self):
        """The name a service knows itself by: for inet, the port part."""
        if self.type == "inet" and ":" in self.name:
            return self.name.rsplit(":", 1)[1]
        return self.name


def _flag(column, value, path, number, what):
    if value in ("y", "-") and what == "unpriv":
        return True
    if value == "-" and what == "private":
        return True
    if value == "-" and what == "chroot":
        return False
    if value == "y":
        return True
    if value == "n":
        return False
    raise ConfigError(path, number, f"bad {what} column '{value}': use y, n or -")


def parse_inet_name(name, path, number):
    """Split an inet service name into (host, port)."""
    host, port = "", name
    if name.startswith("["):
        end = name.find("]")
        if end < 0 or name[end + 1:end + 2] != ":":
            raise ConfigError(path, number, f"bad inet service '{name}': use [address]:port")
        host, port = name[1:end], name[end + 2:]
    elif ":" in name:
        host, port = name.rsplit(":", 1)
    if re.fullmatch(r"[0-9]+", port):
        value = int(port)
    elif re.fullmatch(r"[A-Za-z0-9_.+-]+", port):
        try:
            value = socket.getservbyname(port, "tcp")
        except OSError:
            raise ConfigError(path, number, f"bad port '{port}' in inet service '{name}'") from None
    else:
        raise ConfigError(path, number, f"bad port '{port}' in inet service '{name}'")
    if not 1 <= value <= 65535:
        raise ConfigError(path, number, f"bad port '{port}' in inet service '{name}': must be 1-65535")
    return host, value


def load_master(config_dir=None):
    """Parse DIR/master.cf into a list of ServiceEntry; mistakes raise ConfigError."""
    config_dir = find_config_dir(config_dir)
    path = os.path.join(config_dir, "master.cf")
    entries, seen = [], {}
    for number, text in logical_lines(path):
        cols = text.split()
        if len(cols) < 8:
            raise ConfigError(path, number, f"expected 8 columns (service type private unpriv chroot wakeup maxproc command), found {len(cols)}")
        name, stype, private, unpriv, chroot, wakeup, maxproc, command = cols[:8]
        args = cols[8:]
        if stype not in SERVICE_TYPES:
            raise ConfigError(path, number, f"unknown service type '{stype}' (supported: {', '.join(SERVICE_TYPES)})")
        entry = ServiceEntry(
            name=name, type=stype,
            private=_flag("private", private, path, number, "private"),
            unpriv=_flag("unpriv", unpriv, path, number, "unpriv"),
            chroot=_flag("chroot", chroot, path, number, "chroot"),
            wakeup=0, wakeup_conditional=False, maxproc=0,
            command=command, args=[], file=path, line=number, text=" ".join(cols))
        if stype == "inet" and entry.private and private != "-":
            raise ConfigError(path, number, f"inet service '{name}' cannot be private")
        if stype == "inet":
            entry.private = False
            entry.host, entry.port = parse_inet_name(name, path, number)
        if wakeup != "-":
            m = re.fullmatch(r"([0-9]+)(\??)", wakeup)
            if not m:
                raise ConfigError(path, number, f"bad wakeup time '{wakeup}': use -, N or N?")
            entry.wakeup = int(m.group(1))
            entry.wakeup_conditional = bool(m.group(2))
        if maxproc == "-":
            entry.maxproc = -1      # resolved against default_process_limit by the caller
        elif re.fullmatch(r"[0-9]+", maxproc):
            entry.maxproc = int(maxproc)
        else:
            raise ConfigError(path, number, f"bad maximal process count '{maxproc}': use -, 0 or a positive number")
        if not re.fullmatch(r"/?[A-Za-z0-9_.+-]+(/[A-Za-z0-9_.+-]+)*", command) or ".." in command.split("/"):
            raise ConfigError(path, number, f"bad command name '{command}'")
        i = 0
        while i < len(args):
            arg = args[i]
            if arg == "-o":
                if i + 1 >= len(args):
                    raise ConfigError(path, number, "-o without name=value")
                setting = args[i + 1]
                i += 2
            elif arg.startswith("-o") and len(arg) > 2:
                setting = arg[2:]
                i += 1
            else:
                entry.args.append(arg)
                i += 1
                continue
            oname, sep, ovalue = setting.partition("=")
            if not sep or not _NAME_RE.match(oname):
                raise ConfigError(path, number, f"bad -o setting '{setting}': use -o name=value")
            if oname not in PARAMS:
                raise ConfigError(path, number, f"unknown parameter '{oname}' in -o {setting}")
            entry.overrides[oname] = ovalue
        if entry.key in seen:
            raise ConfigError(path, number, f"duplicate service '{name}/{stype}' (first defined at line {seen[entry.key]})")
        seen[entry.key] = number
        entries.append(entry)
    return entries
