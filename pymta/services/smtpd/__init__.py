"""smtpd - the pymta SMTP server (inbound mail and submission)

SYNOPSIS
    libexec/smtpd -c config_dir -n service -t inet [-o name=value]... [-v]
    libexec/submission ...   (smtpd with the submission defaults below)

DESCRIPTION
    smtpd receives mail over SMTP (RFC 5321) on the sockets the master
    hands it, checks every request against the restriction lists of
    main.cf, and puts accepted messages into the queue through the cleanup
    library; "250 2.0.0 Ok: queued as QID" is sent only once the queue file
    and its directory entry are on disk.  One process serves many clients
    (an asyncio server); the master runs more processes when one is busy.

    The protocol itself is the sans-IO engine pymta.core.proto.smtp_server:
    commands EHLO HELO MAIL RCPT DATA BDAT RSET NOOP VRFY QUIT HELP STARTTLS
    AUTH; extensions PIPELINING SIZE 8BITMIME SMTPUTF8 ENHANCEDSTATUSCODES
    STARTTLS AUTH DSN CHUNKING.  session.py drives it over the connection;
    policy.py holds the restrictions (mynetworks, relay_domains,
    smtpd_relay_restrictions, smtpd_recipient_restrictions and the others,
    access tables, DNS checks, per-client connection limits); sasl_glue.py
    does SMTP AUTH (PLAIN, LOGIN) against etc/users with failure delays and
    refusal per client address.

    The submission services are this program with other settings, given
    with -o in master.cf as Postfix does (or by libexec/submission):
    smtpd_tls_security_level=encrypt, smtpd_sasl_auth_enable=yes,
    smtpd_sasl_auth_required=yes, smtpd_relay_restrictions=
    permit_sasl_authenticated,reject, smtpd_sender_restrictions=
    reject_sender_login_mismatch and syslog_name=$syslog_name/submission.
    With smtpd_tls_wrappermode=yes the whole connection is TLS (port 465).

    Log lines are Postfix's: "connect from name[addr]", "QID:
    client=name[addr]" (by cleanup), "NOQUEUE: reject: RCPT from
    name[addr]: 550 5.1.1 ...; from=<s> to=<r> proto=ESMTP helo=<h>",
    "warning: name[addr]: SASL LOGIN authentication failed: ...",
    "lost connection after DATA from name[addr]", "disconnect from
    name[addr] ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5".

READS
    main.cf; lookup tables named by the restrictions, alias_maps,
    virtual_alias_maps, virtual_mailbox_maps (etc/users); the TLS
    certificate and key (at start: `pymta reload` restarts the processes,
    so a replaced certificate is served after a reload).
WRITES
    Queue files in queue_directory/incoming (through pymta.core.cleanup).
SOCKETS
    Listens on the inet sockets inherited from the master; triggers qmgr
    (public/qmgr) after each message; DNS queries (dns_resolver) for
    client names and reject_unknown_*_domain only.
SECURITY
    Runs as mail_owner.  Everything a client sends is hostile: the engine
    limits line and message sizes, errors and pipelined input; bare CR or
    LF and plaintext sent after STARTTLS are refused (SMTP smuggling,
    command injection); HTTP requests end the session.  Passwords are
    checked in a thread pool and never logged; failed logins are delayed
    and, past auth_failure_limit, refused.  Connection limits per client
    are per process (see docs/smtpd.md).
PARAMETERS
    myhostname mydomain myorigin mydestination virtual_mailbox_domains
    virtual_mailbox_maps virtual_alias_maps alias_maps local_recipient_maps
    recipient_delimiter relay_domains mynetworks smtpd_banner mail_name
    smtpd_timeout smtpd_recipient_limit message_size_limit line_length_limit
    smtpd_soft_error_limit smtpd_hard_error_limit smtpd_error_sleep_time
    smtpd_client_connection_count_limit smtpd_client_connection_rate_limit
    anvil_rate_time_unit smtpd_client_event_limit_exceptions
    smtpd_forbid_bare_newline smtpd_forbid_bare_newline_exclusions
    smtpd_forbid_unauth_pipelining strict_rfc821_envelopes
    disable_vrfy_command smtpd_helo_required smtpd_delay_reject
    smtpd_client_restrictions smtpd_helo_restrictions
    smtpd_sender_restrictions smtpd_relay_restrictions
    smtpd_recipient_restrictions smtpd_data_restrictions
    smtpd_reject_unlisted_recipient smtpd_sender_login_maps reject_code
    defer_code relay_domains_reject_code access_map_reject_code
    non_fqdn_reject_code invalid_hostname_reject_code
    unknown_address_reject_code unknown_local_recipient_reject_code
    unknown_virtual_mailbox_reject_code smtpd_peername_lookup
    smtpd_dns_timeout dns_resolver smtpd_tls_security_level
    smtpd_tls_cert_file smtpd_tls_key_file smtpd_tls_protocols
    smtpd_tls_wrappermode smtpd_sasl_auth_enable smtpd_sasl_auth_required
    smtpd_tls_auth_only auth_failure_limit auth_failure_penalty_time
    local_header_rewrite_clients syslog_name
SEE ALSO
    docs/smtpd.md, docs/auth.md, pymta/core/proto/smtp_server.py,
    pymta/core/cleanup.py
"""

import sys

from pymta.core import log
from pymta.core.errors import ConfigError
from pymta.core.runtime import child

# What libexec/submission sets unless master.cf gives -o for it.
SUBMISSION_DEFAULTS = {
    "syslog_name": "submission",            # appended: $syslog_name/submission
    "smtpd_tls_security_level": "encrypt",
    "smtpd_sasl_auth_enable": "yes",
    "smtpd_sasl_auth_required": "yes",
    "smtpd_relay_restrictions": "permit_sasl_authenticated,reject",
    "smtpd_sender_restrictions": "reject_sender_login_mismatch",
}


def _apply_defaults(ctx, defaults):
    """Settings that -o on the command line did not give (libexec/submission)."""
    cfg = ctx.cfg
    extra = {}
    for name, value in defaults.items():
        if cfg.where(name)[0] == "-o":
            continue
        if name == "syslog_name":
            value = f"{cfg.syslog_name}/{value}"
        extra[name] = value
    ctx.cfg = cfg.with_overrides(extra, "-o")
    log.setup(ctx.program, ctx.cfg, verbose=ctx.verbose)


def main(argv=None, defaults=None):
    ctx = child.start("smtpd", argv)
    try:
        if defaults:
            _apply_defaults(ctx, defaults)
        from pymta.services.smtpd.session import Server
        server = Server(ctx)
    except ConfigError as e:
        log.fatal(str(e))
    child.serve(ctx, server.handle, ssl_context=server.wrapper_context)
    return 0


def submission(argv=None):
    """libexec/submission: smtpd with SUBMISSION_DEFAULTS."""
    return main(argv, SUBMISSION_DEFAULTS)


if __name__ == "__main__":
    sys.exit(main())
