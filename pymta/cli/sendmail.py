"""sendmail - Postfix-compatible mail submission command

SYNOPSIS
    sendmail [option ...] [recipient ...]
    mailq (= sendmail -bp)        newaliases (= sendmail -bi)

DESCRIPTION
    Reads a message from standard input and queues it for the recipients
    named on the command line (each argument may be an RFC 5322 address
    list: `ann, Joe <joe@example.org>`).  Input lines may end in LF or
    CRLF (CRs before LF are removed); leading mbox `From ` lines are
    skipped; a line with a single `.` ends the input unless -i is given.
    Dots are never unstuffed.

    The message goes to the `pickup` service over
    $run_directory/public/pickup (docs/pickup-protocol.md), which queues
    it through the cleanup library and answers with the queue id once the
    queue file is on disk.  When that socket is missing or refuses (the
    master is down), or pickup answers with a temporary failure, sendmail
    writes the message to $queue_directory/maildrop/ instead (fsynced
    before exit 0), where pickup finds it later.  Exit status 0 means the
    message is on disk.

    Options (Postfix's):
    -t          also take recipients from To, Cc and Bcc (or from Resent-To,
                Resent-Cc and Resent-Bcc when present); Bcc and Resent-Bcc
                headers are removed
    -i, -oi     a line with a single dot does not end the input
    -f sender   envelope sender (default: the login name); -f '<>' is the
                null sender.  -r sender: the same.
    -F name     full name for the From: header added when there is none
                (default: $NAME or the password file's gecos field)
    -N dsn      DSN notify: never, or a comma list of success, delay, failure
    -R ret      DSN return: hdrs or full
    -V envid    DSN envelope id
    -B type     body type: 7BIT or 8BITMIME
    -C file, -c dir
                the config directory (-C may name its main.cf)
    -v          print the queue id; twice: verbose output
    -bm         read mail from stdin and queue it (the default)
    -bs         SMTP on stdin/stdout (HELO/EHLO, MAIL, RCPT, DATA, RSET,
                NOOP, QUIT; LF line endings accepted); each message is
                queued as above
    -bp         list the queue: runs `postqueue -p` (as `mailq` does)
    -bi, -I     rebuild the alias databases (newaliases); -oA table: which
    -bd         start the mail system (`pymta start`)
    -bh, -bH    ignored
    -q          flush the queue: runs `postqueue -f`; -qRsite: postqueue -s
                site; -qIid: postqueue -i id; -qinterval: ignored
    -o x, -G, -U, -x, -m, -L x, -O x, -A x, -e x, -h x, -p x
                accepted and ignored, as Postfix does
    -n, -bv, -XV
                not supported (usage error)

EXIT STATUS (sysexits)
    0  queued (on disk)            64 EX_USAGE bad options, no recipients
    65 EX_DATAERR bad address syntax, message too big, unreadable input
    69 EX_UNAVAILABLE the mail system refused the message (the reason is
       printed)                    70 EX_SOFTWARE protocol error
    71 EX_OSERR no login name      75 EX_TEMPFAIL could not queue: try again
    78 EX_CONFIG (never: configuration errors are EX_TEMPFAIL, as Postfix)

READS
    main.cf; stdin.
WRITES
    $queue_directory/maildrop/ (only when pickup is unreachable).
SOCKETS
    $run_directory/public/pickup.
SECURITY
    Runs with the privileges of its caller; no set-id.  pickup takes the
    submitting user's uid from the socket (SO_PEERCRED), or from the owner
    of the maildrop file, never from anything sendmail says.  Any user may
    choose the envelope sender (as with Postfix's default
    authorized_submit_users); the Received header records the uid.
PARAMETERS
    queue_directory hash_queue_depth run_directory message_size_limit
    myhostname mail_name smtpd_banner line_length_limit alias_database
    maillog_file
SEE ALSO
    docs/pickup-protocol.md, pymta/services/pickup.py, postqueue, mailq,
    newaliases, Postfix sendmail(1).
"""

import os
import pwd
import re
import shutil
import socket
import sys

from pymta.core import config, ipc, log
from pymta.core.address import AddressError, decode_xtext, parse_mailbox
from pymta.core.cleanup import extract_recipients, parse_address_list
from pymta.core.errors import (
    EX_DATAERR, EX_OK, EX_OSERR, EX_SOFTWARE, EX_TEMPFAIL, EX_UNAVAILABLE, EX_USAGE,
    ConfigError, PymtaError,
)
from pymta.core.qfile import POST_ATTRS
from pymta.core.queue import Queue
from pymta.core.trigger import service_socket

PICKUP_TIMEOUT = 60.0          # seconds for pickup's answer, then maildrop/
READ_CHUNK = 65536
MODE_ENQUEUE, MODE_NEWALIAS, MODE_MAILQ, MODE_DAEMON = "enqueue", "newalias", "mailq", "daemon"
MODE_USER, MODE_FLUSHQ, MODE_IGNORE = "user", "flushq", "ignore"
WITH_ARG = set("ABCFLNORVXbcefhopqr")
NO_ARG = set("GIUimntvx")
_DOT_LINE = re.compile(rb"(?:\A|\n)\.\r*\n")
_DOT_TAIL = re.compile(rb"\.\r*")
_FROM_LINE = re.compile(rb">*From ")
_CR_LF = re.compile(rb"\r+\n")
_NOTIFY = {"never", "success", "delay", "failure"}
_PRINTABLE = re.compile(r"[\x21-\x7e]+")


class Exit(Exception):
    """End the program with `status`, printing "sendmail: fatal: text"."""

    def __init__(self, status, text=""):
        super().__init__(text)
        self.status = status
        self.text = text


class Options:
    def __init__(self):
        self.mode = MODE_ENQUEUE
        self.config_dir = None
        self.extract = False
        self.dots = True
        self.sender = None
        self.full_name = None
        self.notify = None
        self.ret = None
        self.envid = None
        self.body_type = None
        self.verbose = 0
        self.qtime = None
        self.site = None
        self.queue_id = None
        self.alias_db = None
        self.recipients = []
        self.warnings = []


def parse_args(argv, prog="sendmail"):
    """Postfix's sendmail command line; options may follow recipients
    (GNU getopt order) until `--`."""
    o = Options()
    if prog == "mailq":
        o.mode = MODE_MAILQ
    elif prog == "newaliases":
        o.mode = MODE_NEWALIAS
    i = 0
    while i < len(argv):
        a = argv[i]
        i += 1
        if a == "--":
            o.recipients.extend(argv[i:])
            break
        if not a.startswith("-") or a == "-":
            o.recipients.append(a)
            continue
        if a == "-q":
            o.mode = MODE_FLUSHQ
            continue
        j = 1
        while j < len(a):
            c = a[j]
            if c in WITH_ARG:
                value = a[j + 1:]
                if not value:
                    if i >= len(argv):
                        raise Exit(EX_USAGE, f"option requires an argument -- '{c}'")
                    value = argv[i]
                    i += 1
                _option(o, c, value)
                break
            if c not in NO_ARG:
                raise Exit(EX_USAGE, f"invalid option -- '{c}'; usage: {prog} [options] [recipient ...]")
            _flag(o, c)
            j += 1
    if o.extract and o.mode != MODE_ENQUEUE:
        raise Exit(EX_USAGE, "-t can be used only in delivery mode")
    if (o.site or o.queue_id) and o.mode != MODE_ENQUEUE:
        raise Exit(EX_USAGE, "-qR and -qI can be used only in delivery mode")
    return o


def _flag(o, c):
    if c == "i":
        o.dots = False
    elif c == "t":
        o.extract = True
    elif c == "v":
        o.verbose += 1
    elif c == "I":
        o.mode = MODE_NEWALIAS
    elif c == "n":
        raise Exit(EX_USAGE, "-n option not supported")
    # G U m x: accepted and ignored


def _option(o, c, value):
    if c in "fr":
        o.sender = value
    elif c == "F":
        o.full_name = value
    elif c == "C":
        o.config_dir = os.path.dirname(value) if os.path.basename(value) == "main.cf" else value
    elif c == "c":
        o.config_dir = value
    elif c == "N":
        words = [w.strip().lower() for w in value.split(",")]
        if not words or not set(words) <= _NOTIFY or ("never" in words and len(words) > 1):
            o.warnings.append("bad -N option value -- ignored")
        else:
            o.notify = ",".join(w.upper() for w in words)
    elif c == "R":
        if value.lower() not in ("hdrs", "full"):
            raise Exit(EX_USAGE, "bad -R option value: use hdrs or full")
        o.ret = value.upper()
    elif c == "V":
        if len(value) > 100:
            o.warnings.append("too long -V option value -- ignored")
        elif not _PRINTABLE.fullmatch(value):
            o.warnings.append("bad syntax in -V option value -- ignored")
        else:
            o.envid = value
    elif c == "B":
        if value.upper() not in ("8BITMIME", "7BIT"):
            raise Exit(EX_USAGE, "-B option needs 8BITMIME or 7BIT")
        o.body_type = value.upper()
    elif c == "X":
        raise Exit(EX_USAGE, f"unsupported: -X{value[:1]}")
    elif c == "b":
        mode = {"m": MODE_ENQUEUE, "s": MODE_USER, "p": MODE_MAILQ, "i": MODE_NEWALIAS,
                "d": MODE_DAEMON, "h": MODE_IGNORE, "H": MODE_IGNORE}.get(value[:1])
        if mode is None:
            raise Exit(EX_USAGE, f"unsupported: -b{value[:1]}")
        o.mode = mode
    elif c == "o":
        if value[:1] == "i":
            o.dots = False
        elif value[:1] == "A":
            if len(value) < 2:
                raise Exit(EX_USAGE, "-oA requires pathname")
            o.alias_db = value[1:]
    elif c == "q":
        if value[:1].isdigit():
            o.qtime = value
        elif value[:1] == "R":
            if len(value) < 2:
                raise Exit(EX_USAGE, "specify: -qRsitename")
            o.site = value[1:]
        elif value[:1] == "I":
            if len(value) < 2:
                raise Exit(EX_USAGE, "specify: -qIqueueid")
            o.queue_id = value[1:]
        else:
            raise Exit(EX_USAGE, f"-q{value[:1]} is not implemented")
    # A L O e h p: accepted and ignored


# -- input ----------------------------------------------------------------------------------

def read_message(fd, dots, limit):
    """The message from `fd`, with a lone-dot line ending it when `dots`;
    CRs before LF removed, leading `From ` lines skipped.  Exit with
    EX_DATAERR when it is larger than `limit` (0: no limit).

    Reading stops right after the dot line (a terminal user types `.`),
    and only the start of each new line is examined for it, so a long
    message costs one pass."""
    buf = bytearray()
    line_start = 0          # start of the last, incomplete line in buf
    while True:
        try:
            data = os.read(fd, READ_CHUNK)
        except OSError as e:
            raise Exit(EX_DATAERR, f"error reading input: {e.strerror}") from None
        if not data:
            if dots and _DOT_TAIL.fullmatch(buf, line_start):
                del buf[line_start:]
            break
        old = len(buf)
        buf += data
        if dots:
            # A dot line can start inside the old tail only if that tail is
            # still a dot (and CRs); otherwise only at a newline in new data.
            if old == line_start or (old - line_start <= 64
                                     and _DOT_TAIL.fullmatch(buf, line_start, old)):
                pos = max(0, line_start - 1)
            else:
                pos = old
            m = _DOT_LINE.search(buf, pos)
            if m:
                del buf[m.start() + (1 if buf[m.start()] == 10 else 0):]
                break
            nl = buf.rfind(b"\n", old)
            if nl >= 0:
                line_start = nl + 1
        if limit and len(buf) > 2 * limit + 1024:
            raise Exit(EX_DATAERR, "message file too big")
    data = bytes(buf)
    if b"\r" in data:
        data = _CR_LF.sub(b"\n", data)
    while _FROM_LINE.match(data):
        nl = data.find(b"\n")
        data = b"" if nl < 0 else data[nl + 1:]
    if limit and len(data) > limit:
        raise Exit(EX_DATAERR, "message file too big")
    return data


def check_address(addr, what):
    try:
        parse_mailbox(addr, smtputf8=True, allow_local_only=True)
    except AddressError as e:
        raise Exit(EX_DATAERR, f"bad {what} address syntax: <{addr}>: {e}") from None


def parse_sender(text):
    if text.strip() in ("", "<>"):
        return ""
    found = parse_address_list(text)
    if not found:
        raise Exit(EX_DATAERR, f"bad sender address: {text}")
    return found[0]


def login_name():
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        raise Exit(EX_OSERR, f"no login name found for user ID {os.getuid()}") from None


def gecos_name():
    name = os.environ.get("NAME")
    if name:
        return name
    try:
        pw = pwd.getpwuid(os.getuid())
    except KeyError:
        return ""
    gecos = pw.pw_gecos.split(",")[0].strip()
    return gecos.replace("&", pw.pw_name.capitalize())


# -- hand-off -------------------------------------------------------------------------------

class Refused(Exception):
    """pickup refused the message permanently."""

    def __init__(self, dsn, reason):
        super().__init__(f"{dsn} {reason}")
        self.dsn = dsn
        self.reason = reason


def submit_to_pickup(cfg, sender, rcpts, content, attrs, timeout=PICKUP_TIMEOUT):
    """Queue id from pickup, or None when pickup is unreachable or failed
    temporarily (the caller then writes to maildrop/).  Refused for a
    permanent refusal.  rcpts: (address, notify, orcpt) triples."""
    path = service_socket(cfg, "pickup")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except OSError as e:
            log.verbose(f"pickup socket {path}: {e.strerror}")
            return None
        pairs = [("request", "submit"), ("sender", sender)]
        for address, notify, orcpt in rcpts:
            pairs.append(("rcpt", address))
            if notify:
                pairs.append(("notify", notify))
            if orcpt:
                pairs.append(("orcpt", orcpt))
        pairs.extend(attrs.items())
        pairs.append(("size", str(len(content))))
        try:
            s.sendall(ipc.encode(pairs))
            s.sendall(content)
        except (BrokenPipeError, ConnectionResetError) as e:
            # pickup may have refused early (too big) and said why: read on.
            log.verbose(f"pickup: send: {e.strerror}")
        except OSError as e:
            log.verbose(f"pickup: send: {e}")
            return None
        try:
            with s.makefile("rb") as f:
                reply = ipc.read_attrs_sync(f)
        except (OSError, ipc.ProtocolError) as e:
            log.verbose(f"pickup: no answer: {e}")
            return None
    finally:
        s.close()
    if reply is None:
        return None
    status = reply.get("status")
    if status == "ok" and reply.get("queue_id"):
        return reply.get("queue_id")
    if status == "permfail":
        raise Refused(reply.get("dsn", "5.0.0"), reply.get("reason", "refused"))
    log.verbose(f"pickup: {status} {reply.get('dsn', '')} {reply.get('reason', '')}")
    return None


def write_maildrop(cfg, sender, rcpts, content, attrs):
    queue = Queue(cfg.queue_directory, cfg.hash_queue_depth)
    notifies = {n for _a, n, _o in rcpts}
    notify = notifies.pop() if len(notifies) == 1 else None
    post = {k: v for k, v in attrs.items() if k in POST_ATTRS}
    try:
        return queue.write_maildrop(sender, [a for a, _n, _o in rcpts], content, post, notify)
    except ValueError as e:
        raise Exit(EX_DATAERR, f"cannot queue this message: {e}") from None
    except OSError as e:
        raise Exit(EX_TEMPFAIL, f"error writing queue file: {e.strerror or e}") from None
    finally:
        queue.close()


def deliver(cfg, sender, rcpts, content, attrs):
    """Hand the message to pickup, else to maildrop/; return its id."""
    try:
        qid = submit_to_pickup(cfg, sender, rcpts, content, attrs)
    except Refused as e:
        raise Exit(EX_UNAVAILABLE, f"{e.dsn} {e.reason}") from None
    if qid is None:
        qid = write_maildrop(cfg, sender, rcpts, content, attrs)
        log.verbose(f"queued in maildrop/ as {qid}")
    return qid


# -- modes ------------------------------------------------------------------------------------

def enqueue(cfg, o):
    sender = login_name() if o.sender is None else parse_sender(o.sender)
    if sender:
        check_address(sender, "sender")
    recipients = []
    for arg in o.recipients:
        found = parse_address_list(arg)
        if not found:
            raise Exit(EX_DATAERR, f"bad recipient address: {arg}")
        recipients.extend(found)
    content = read_message(sys.stdin.fileno(), o.dots, cfg.message_size_limit)
    if o.extract:
        extracted, content = extract_recipients(content)
        recipients.extend(extracted)
    if not recipients:
        raise Exit(EX_USAGE, "No recipient addresses found in message header" if o.extract else
                   "Recipient addresses must be specified on the command line or via the -t option")
    for r in recipients:
        check_address(r, "recipient")
    attrs = {}
    full_name = o.full_name if o.full_name is not None else gecos_name()
    if full_name:
        attrs["full_name"] = re.sub(r"[\x00-\x1f\x7f]", " ", full_name)[:200]
    for name, value in (("ret", o.ret), ("envid", o.envid), ("body_type", o.body_type)):
        if value:
            attrs[name] = value
    qid = deliver(cfg, sender, [(r, o.notify, None) for r in recipients], content, attrs)
    if o.verbose:
        sys.stderr.write(f"sendmail: queued as {qid}\n")
    return EX_OK


def smtp_session(cfg, o):
    """-bs: SMTP on stdin/stdout with the sans-IO engine of smtpd."""
    from pymta.core.proto import smtp_server as smtp

    settings = smtp.ServerSettings(
        line_length_limit=max(512, cfg.line_length_limit),
        message_size_limit=cfg.message_size_limit,
        forbid_bare_newline=False, forbid_unauth_pipelining=False,
        starttls_available=False, auth_mechanisms=(), chunking=False)
    engine = smtp.SMTPServer(cfg.myhostname, settings)
    out = sys.stdout.buffer
    stdin = sys.stdin.buffer
    engine.greeting_ok(cfg.smtpd_banner)

    def on_message(ev):
        params = ev.mail_params
        attrs = {}
        if params.get("RET"):
            attrs["ret"] = params["RET"].upper()
        if params.get("ENVID"):
            try:
                attrs["envid"] = decode_xtext(params["ENVID"])
            except AddressError:
                attrs["envid"] = params["ENVID"]
        if params.get("BODY"):
            attrs["body_type"] = params["BODY"].upper()
        if "SMTPUTF8" in params:
            attrs["smtputf8"] = "1"
        rcpts = []
        for address, rparams in ev.recipients:
            orcpt = rparams.get("ORCPT")
            if orcpt and ";" in orcpt:
                kind, _, text = orcpt.partition(";")
                try:
                    orcpt = f"{kind};{decode_xtext(text)}"
                except AddressError:
                    orcpt = None
            rcpts.append((address, rparams.get("NOTIFY"), orcpt))
        content = ev.data.replace(b"\r\n", b"\n")
        try:
            qid = deliver(cfg, ev.mail_from, rcpts, content, attrs)
        except Exit as e:
            if e.status == EX_UNAVAILABLE:
                dsn, _, text = e.text.partition(" ")
                code = 552 if dsn == "5.3.4" else 554
                engine.reject(code, dsn if re.fullmatch(r"5\.\d+\.\d+", dsn) else "5.0.0", text)
            else:
                engine.reject(451, "4.3.0", "Error: queue file write error")
            return
        engine.accept(f"Ok: queued as {qid}")

    def pump():
        while True:
            ev = engine.next_event()
            if ev is None:
                out.flush()
                return True
            if isinstance(ev, smtp.Reply):
                out.write(ev.data)
            elif isinstance(ev, smtp.Close):
                out.flush()
                return False
            elif isinstance(ev, smtp.Message):
                out.flush()
                on_message(ev)
            elif isinstance(ev, (smtp.Helo, smtp.MailFrom, smtp.RcptTo)):
                engine.accept()
            elif isinstance(ev, smtp.Vrfy):
                engine.reject(502, "5.5.1", "VRFY command is disabled")

    running = pump()
    while running:
        line = stdin.readline(1 << 16)
        if not line:
            break
        if line.endswith(b"\n") and not line.endswith(b"\r\n"):
            line = line[:-1] + b"\r\n"
        engine.feed(line)
        running = pump()
    return EX_OK


def sibling_program(name):
    """A command installed beside this one (bin/ or the venv), else on PATH."""
    for d in (os.path.dirname(os.path.abspath(sys.argv[0])),
              os.path.dirname(os.path.realpath(sys.argv[0]))):
        path = os.path.join(d, name)
        if os.access(path, os.X_OK):
            return path
    path = shutil.which(name)
    if path is None:
        raise Exit(EX_UNAVAILABLE, f"cannot find the {name} command")
    return path


def run_program(name, cfg, args):
    path = sibling_program(name)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(path, [name, "-c", cfg.config_dir, *args])
    except OSError as e:
        raise Exit(EX_UNAVAILABLE, f"cannot execute {path}: {e.strerror}") from None


def _setup_logging(cfg, verbose):
    """Log to maillog_file when this user may write it (errors also go to
    stderr); a user who may not just gets stderr.  -v -v: verbose lines,
    on stderr too."""
    path = cfg.maillog_file
    if path and os.access(path, os.W_OK):
        log.setup("sendmail", cfg, stderr=verbose, verbose=verbose)
        return True
    if verbose:
        log.setup("sendmail", None, stderr=True, verbose=True)
    return False


def run(argv, prog):
    o = parse_args(argv, prog)
    try:
        cfg = config.load(o.config_dir)
    except ConfigError as e:
        raise Exit(EX_TEMPFAIL, str(e)) from None
    logging = _setup_logging(cfg, o.verbose > 1)
    for w in o.warnings:
        sys.stderr.write(f"{prog}: warning: {w}\n")
        if logging:
            log.warning(w)
    if o.qtime and o.mode != MODE_DAEMON:
        return EX_OK
    if o.mode == MODE_IGNORE:
        return EX_OK
    if o.mode != MODE_ENQUEUE and o.recipients:
        raise Exit(EX_USAGE, {MODE_MAILQ: "display queue mode requires no recipient",
                              MODE_FLUSHQ: "flush queue mode requires no recipient",
                              MODE_NEWALIAS: "alias initialization mode requires no recipient",
                              MODE_USER: "stand-alone mode requires no recipient",
                              MODE_DAEMON: "daemon mode requires no recipient"}[o.mode])
    verbose = ["-v"] * o.verbose
    if o.mode == MODE_MAILQ:
        run_program("postqueue", cfg, ["-p", *verbose])
    if o.mode == MODE_FLUSHQ:
        run_program("postqueue", cfg, ["-f", *verbose])
    if o.mode == MODE_DAEMON:
        run_program("pymta", cfg, ["start"])
    if o.mode == MODE_NEWALIAS:
        from pymta.cli.newaliases import rebuild
        specs = [o.alias_db] if o.alias_db else None
        return rebuild(cfg, specs, prog=prog, verbose=bool(o.verbose))
    if o.mode == MODE_USER:
        return smtp_session(cfg, o)
    if o.site:
        if o.recipients:
            raise Exit(EX_USAGE, "flush site requires no recipient")
        run_program("postqueue", cfg, ["-s", o.site, *verbose])
    if o.queue_id:
        if o.recipients:
            raise Exit(EX_USAGE, "flush queue_id requires no recipient")
        run_program("postqueue", cfg, ["-i", o.queue_id, *verbose])
    return enqueue(cfg, o)


def main(argv=None):
    prog = os.path.basename(sys.argv[0]) if argv is None else "sendmail"
    if prog not in ("mailq", "newaliases"):
        prog = "sendmail"
    argv = sys.argv[1:] if argv is None else argv
    try:
        return run(argv, prog)
    except Exit as e:
        who = ""
        if e.status not in (EX_USAGE,):
            try:
                who = f"{pwd.getpwuid(os.getuid()).pw_name}({os.getuid()}): "
            except KeyError:
                who = f"({os.getuid()}): "
        sys.stderr.write(f"{prog}: fatal: {who}{e.text}\n")
        if log.current_fd() is not None:
            log.error(f"{who}{e.text}")
        return e.status
    except PymtaError as e:
        sys.stderr.write(f"{prog}: fatal: {e}\n")
        return EX_SOFTWARE
