"""The anchors pymta is measured against: a private Postfix instance and a
private Dovecot, both on loopback ports, with everything (configuration,
queue, mailboxes, logs, pid files, sockets) below the harness's own
directory, and smtp-sink (the load generator's ceiling).

Installation (as root, when missing): Debian's postfix, dovecot-core and
dovecot-pop3d, Postfix with debconf's "No configuration" so that the
system gets no main.cf and no running mail system.  While apt-get runs, a
policy-rc.d that forbids starting services is put in place if the machine
has none, so installing Dovecot starts no system-wide daemon.

Postfix runs as `postfix -c DIR start|stop` with its own config_directory
and queue_directory (no chroot, maillog_file through postlogd, default
durability: a queue file is fsynced before 250).  Mail for
bench@bench.example goes through the virtual(8) agent into a Maildir.  A
second smtpd port puts every message it accepts on hold (HOLD action of
`check_client_access static:HOLD`): that is the accept-only side of W2,
because cleanup writes and fsyncs the queue file exactly as for delivery
and qmgr never sees it.

Dovecot runs as `dovecot -c FILE` and stops with `dovecot -c FILE stop`;
base_dir, state and log are private; users come from a passwd-file.  The
bench user's password is the very `{ARGON2ID}` hash string that `pymta user
add` wrote into pymta's etc/users, so both servers verify the same argon2id
hash (the same memory and time cost) at every login.
"""

import grp
import os
import pwd
import shutil
import subprocess

from tests.bench.util import (
    LOOPBACK, BenchError, cmdline, port_listening, read_pid, run, run_daemon, wait_for,
)

BENCH_DOMAIN = "bench.example"
BENCH_USER = "bench"
BENCH_ADDR = f"{BENCH_USER}@{BENCH_DOMAIN}"
BENCH_PASSWORD = "bench-secret-9"
MAILBOX_ACCOUNT = "nobody"          # owner of the anchors' mailboxes

DEB_PACKAGES = {
    "postfix": ["/usr/sbin/postfix", "/usr/sbin/smtp-source", "/usr/sbin/smtp-sink",
                "/usr/sbin/postqueue", "/usr/lib/postfix/sbin/postlogd"],
    "dovecot-core": ["/usr/sbin/dovecot"],
    "dovecot-pop3d": ["/usr/lib/dovecot/pop3", "/usr/lib/dovecot/pop3-login"],
}
SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
POLICY_RC_D = "/usr/sbin/policy-rc.d"


def missing_packages():
    return [pkg for pkg, files in DEB_PACKAGES.items()
            if not all(os.path.exists(f) for f in files)]


def ensure_installed(log=print):
    """Install the anchors' Debian packages when missing (root only)."""
    missing = missing_packages()
    if not missing:
        return
    if os.geteuid() != 0:
        raise BenchError("missing Debian packages " + " ".join(missing)
                         + " (run make bench as root, or install them)")
    log("installing Debian packages: " + " ".join(missing))
    run(["debconf-set-selections"], input="postfix postfix/main_mailer_type select No configuration\n")
    made_policy = False
    if not os.path.exists(POLICY_RC_D):
        with open(POLICY_RC_D, "w") as f:
            f.write("#!/bin/sh\n# temporary, by pymta's make bench: start no services\nexit 101\n")
        os.chmod(POLICY_RC_D, 0o755)
        made_policy = True
    try:
        env = {"DEBIAN_FRONTEND": "noninteractive"}
        run(["apt-get", "update", "-qq"], timeout=600, env=env)
        run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
            timeout=900, env=env)
    finally:
        if made_policy:
            os.unlink(POLICY_RC_D)
    still = missing_packages()
    if still:
        raise BenchError("still missing after apt-get: " + " ".join(still))


def mailbox_ids():
    pw = pwd.getpwnam(MAILBOX_ACCOUNT)
    return pw.pw_uid, pw.pw_gid


def make_maildir(path, uid=None, gid=None):
    """A Maildir (new cur tmp) owned by uid:gid, parents 0755."""
    for sub in ("", "new", "cur", "tmp"):
        d = os.path.join(path, sub)
        os.makedirs(d, 0o700, exist_ok=True)
        if uid is not None:
            os.chown(d, uid, gid)


# -- Postfix ---------------------------------------------------------------------------

POSTFIX_MASTER_CF = """\
# master.cf of the benchmark's private Postfix (no chroot).
{listen}:{smtp_port} inet n - n - - smtpd
{listen}:{hold_port} inet n - n - - smtpd
  -o syslog_name=postfix-bench/hold
  -o smtpd_client_restrictions=check_client_access,static:HOLD
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

POSTFIX_MAIN_CF = """\
# main.cf of the benchmark's private Postfix instance: defaults except
# where a private, loopback-only instance needs otherwise.
compatibility_level = 3.6
queue_directory = {top}/spool
data_directory = {top}/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
shlib_directory = /usr/lib/postfix
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
syslog_name = postfix-bench
maillog_file = {top}/log/maillog
maillog_file_prefixes = {top}
myhostname = anchor.{domain}
mydomain = {domain}
myorigin = $myhostname
mydestination =
inet_interfaces = {listen}
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost =
alias_maps =
alias_database =
biff = no
smtpd_banner = $myhostname ESMTP
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
virtual_mailbox_domains = {domain}
virtual_mailbox_base = {top}/mail
virtual_mailbox_maps = texthash:{top}/etc/vmailbox
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
"""


class Postfix:
    """A private Postfix instance below `top`."""

    name = "Postfix"

    def __init__(self, top, smtp_port, hold_port):
        self.top = top
        self.etc = os.path.join(top, "etc")
        self.spool = os.path.join(top, "spool")
        self.smtp_port = smtp_port
        self.hold_port = hold_port
        self.maillog = os.path.join(top, "log", "maillog")
        self.maildir = os.path.join(top, "mail", BENCH_DOMAIN, BENCH_USER)
        self.started = False

    def command(self, *args):
        """A Postfix command line against this instance."""
        return [args[0], "-c", self.etc, *args[1:]]

    def setup(self):
        uid, gid = mailbox_ids()
        for d in ("etc", "spool", "data", "log", "mail"):
            os.makedirs(os.path.join(self.top, d), 0o755, exist_ok=True)
        os.chmod(self.top, 0o755)
        pf = pwd.getpwnam("postfix")
        os.chown(os.path.join(self.top, "data"), pf.pw_uid, pf.pw_gid)
        values = dict(top=self.top, domain=BENCH_DOMAIN, listen=LOOPBACK, uid=uid, gid=gid,
                      smtp_port=self.smtp_port, hold_port=self.hold_port)
        with open(os.path.join(self.etc, "main.cf"), "w") as f:
            f.write(POSTFIX_MAIN_CF.format(**values))
        with open(os.path.join(self.etc, "master.cf"), "w") as f:
            f.write(POSTFIX_MASTER_CF.format(**values))
        with open(os.path.join(self.etc, "vmailbox"), "w") as f:
            f.write(f"{BENCH_ADDR} {BENCH_DOMAIN}/{BENCH_USER}/\n")
        # Debian's postfix-script wants these beside main.cf.
        for name in ("dynamicmaps.cf", "postfix-files"):
            src = os.path.join("/etc/postfix", name)
            if os.path.exists(src):
                shutil.copy(src, os.path.join(self.etc, name))
        make_maildir(os.path.join(self.top, "mail", BENCH_DOMAIN), uid, gid)
        make_maildir(self.maildir, uid, gid)
        open(self.maillog, "a").close()
        # post-install creates the queue directories with their owners.
        run(["postfix", "-c", self.etc, "check"], timeout=120)

    def start(self):
        run_daemon(["postfix", "-c", self.etc, "start"], os.path.join(self.top, "log", "start.log"))
        self.started = True
        wait_for(self.master_pid, 30, what="Postfix master pid")
        wait_for(lambda: port_listening(self.smtp_port), 30, what=f"Postfix on port {self.smtp_port}")

    def stop(self):
        if not self.started and not self.master_pid():
            return
        run(["postfix", "-c", self.etc, "stop"], timeout=120, check=False)
        wait_for(lambda: not self.master_pid(), 60, what="Postfix master to exit")
        self.started = False

    def reload(self):
        run(["postfix", "-c", self.etc, "reload"], timeout=60)

    def master_pid(self):
        return read_pid(os.path.join(self.spool, "pid", "master.pid"))

    def postconf(self, *settings):
        run(["postconf", "-c", self.etc, "-e", *settings], timeout=60)

    def queue_count(self, *queues):
        """Files in the named queue directories (recursively, hashed)."""
        n = 0
        for q in queues:
            for _dir, _sub, files in os.walk(os.path.join(self.spool, q)):
                n += len(files)
        return n

    def delete_queue(self, queue="ALL"):
        """postsuper -d ALL [queue]: empty a queue."""
        args = ["postsuper", "-c", self.etc, "-d", "ALL"]
        if queue != "ALL":
            args.append(queue)
        run(args, timeout=600)

    def log_tail(self, n=20):
        try:
            with open(self.maillog, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except FileNotFoundError:
            return ""


class SmtpSink:
    """smtp-sink on a loopback port: takes mail and throws it away."""

    name = "smtp-sink"

    def __init__(self, top, port):
        self.top = top
        self.port = port
        self.proc = None

    def args(self):
        return [SMTP_SINK, "-u", MAILBOX_ACCOUNT, f"{LOOPBACK}:{self.port}", "1024"]

    def start(self):
        os.makedirs(self.top, exist_ok=True)
        self.log = open(os.path.join(self.top, "smtp-sink.log"), "wb")
        self.proc = subprocess.Popen(self.args(), stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: port_listening(self.port) or self.proc.poll() is not None, 15,
                 what="smtp-sink to listen")
        if self.proc.poll() is not None:
            raise BenchError(f"{cmdline(self.args())} exited {self.proc.returncode}")

    def master_pid(self):
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self.log.close()
        self.proc = None


# -- Dovecot ---------------------------------------------------------------------------

DOVECOT_CONF = """\
# The benchmark's private Dovecot: POP3 on one loopback port, passwd-file
# users, Maildir under {top}/mail; nothing outside {top}.
instance_name = dovecot-bench-{pop3_port}
base_dir = {top}/run
state_dir = {top}/state
log_path = {top}/log/dovecot.log
info_log_path = {top}/log/dovecot.log
protocols = pop3
listen = {listen}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:{top}/mail/%d/%n
first_valid_uid = 1
passdb {{
  driver = passwd-file
  args = scheme=ARGON2ID username_format=%u {top}/users
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={top}/mail/%d/%n
}}
service pop3-login {{
  inet_listener pop3 {{
    address = {listen}
    port = {pop3_port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service submission-login {{
  inet_listener submission {{
    port = 0
  }}
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0600
  }}
}}
"""


class Dovecot:
    """A private Dovecot (POP3 only) below `top`."""

    name = "Dovecot"

    def __init__(self, top, pop3_port):
        self.top = top
        self.pop3_port = pop3_port
        self.conf = os.path.join(top, "dovecot.conf")
        self.maildir = os.path.join(top, "mail", BENCH_DOMAIN, BENCH_USER)
        self.started = False

    def setup(self, password_hash=None):
        """The configuration, the users file and the Maildir.  `password_hash`
        is the bench user's `{ARGON2ID}...` string from pymta's users file
        (the same hash on both sides); without one (pymta could not be set
        up), doveadm makes an argon2id hash."""
        uid, gid = mailbox_ids()
        if password_hash is None:
            password_hash = run(["doveadm", "pw", "-s", "ARGON2ID", "-p", BENCH_PASSWORD],
                                timeout=60).stdout.strip()
        if not password_hash.upper().startswith("{ARGON2ID}"):
            raise BenchError(f"the bench user's password hash is not {{ARGON2ID}}: "
                             f"{password_hash[:20]}...")
        # Dovecot must verify it, or W4 would fail at the login anyway.
        run(["doveadm", "pw", "-t", password_hash, "-p", BENCH_PASSWORD], timeout=60)
        for d in ("run", "state", "log", "mail"):
            os.makedirs(os.path.join(self.top, d), 0o755, exist_ok=True)
        os.chmod(self.top, 0o755)
        with open(self.conf, "w") as f:
            f.write(DOVECOT_CONF.format(top=self.top, listen=LOOPBACK, pop3_port=self.pop3_port,
                                        uid=uid, gid=gid))
        users = os.path.join(self.top, "users")
        with open(users, "w") as f:
            f.write(f"{BENCH_ADDR}:{password_hash}::::::\n")
        os.chmod(users, 0o640)
        os.chown(users, 0, grp.getgrnam("dovecot").gr_gid)
        make_maildir(os.path.join(self.top, "mail", BENCH_DOMAIN), uid, gid)
        make_maildir(self.maildir, uid, gid)
        # Fails here, with Dovecot's own words, on a configuration error.
        run(["doveconf", "-c", self.conf, "-n"], timeout=60)

    def start(self):
        run_daemon(["dovecot", "-c", self.conf], os.path.join(self.top, "log", "start.log"), 60)
        self.started = True
        wait_for(self.master_pid, 30, what="Dovecot master pid")
        wait_for(lambda: port_listening(self.pop3_port), 30, what=f"Dovecot on port {self.pop3_port}")

    def stop(self):
        if not self.started and not self.master_pid():
            return
        run(["dovecot", "-c", self.conf, "stop"], timeout=60, check=False)
        wait_for(lambda: not self.master_pid(), 60, what="Dovecot to exit")
        self.started = False

    def master_pid(self):
        return read_pid(os.path.join(self.top, "run", "master.pid"))
