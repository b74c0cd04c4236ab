"""Every main.cf parameter, declared once: name, type, default, description.

This table is the single source of defaults.  `postconf -d` prints it,
`pymta check` and `postconf` report names that are not in it, and
`docs/parameters.md` is generated from it.  Defaults may refer to other
parameters with `$name`, expanded when the configuration is read.

Types:
  str    a string (after $name expansion)
  int    a decimal integer
  bool   yes/no (also true/false, 1/0)
  time   a number with an optional unit s, m, h, d, w (the default unit is
         the one given in the declaration); the typed value is in seconds
  size   a number of bytes
  list   names separated by commas and/or white space
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    default: str
    doc: str
    unit: str = "s"     # default unit for time parameters


def _p(name, type_, default, doc, unit="s"):
    return Param(name, type_, default, doc, unit)


_TABLE = [
    # --- instance and paths -------------------------------------------------
    _p("config_directory", "str", "", "Directory of main.cf and master.cf (set by -c or MAIL_CONFIG; read-only)."),
    _p("instance_directory", "str", "", "Top directory of the instance (default: the parent of config_directory)."),
    _p("queue_directory", "str", "$instance_directory/spool", "Top of the mail queue: maildrop incoming active deferred hold corrupt defer bounce."),
    _p("run_directory", "str", "$instance_directory/run", "Pid file and the public/ and private/ Unix sockets."),
    _p("virtual_mailbox_base", "str", "$instance_directory/mail", "Virtual mailboxes live in $virtual_mailbox_base/<domain>/<localpart>/ (Maildir++)."),
    _p("maillog_file", "str", "$instance_directory/log/maillog", "Log file; empty means syslog."),
    _p("daemon_directory", "str", "", "Directory of the daemon programs (default: the libexec/ of this installation)."),
    _p("mail_owner", "str", "pymta", "Account the services run as when the master is started as root."),
    _p("default_privs", "str", "nobody", "Account used for deliveries to commands and files when no other owner applies."),
    _p("import_environment", "list", "MAIL_CONFIG TZ LANG=C PATH=/usr/bin:/bin", "Environment passed to child processes."),
    # --- identity -------------------------------------------------------------
    _p("myhostname", "str", "localhost", "The fully qualified name of this host."),
    _p("mydomain", "str", "localdomain", "The domain of this host."),
    _p("myorigin", "str", "$myhostname", "The domain appended to unqualified sender addresses of local submissions."),
    _p("mydestination", "list", "$myhostname, localhost.$mydomain, localhost", "Domains delivered to system users and aliases by the local transport."),
    _p("virtual_mailbox_domains", "list", "$mydomain", "Domains whose users are listed in $virtual_mailbox_maps and delivered to Maildirs under $virtual_mailbox_base."),
    _p("virtual_mailbox_maps", "str", "passwd-file:$config_directory/users", "The virtual mailbox users (Dovecot passwd-file format)."),
    _p("syslog_name", "str", "pymta", "The program name prefix in log lines: $syslog_name/smtpd."),
    _p("syslog_facility", "str", "mail", "Syslog facility used when maillog_file is empty."),
    _p("inet_interfaces", "list", "all", "Addresses listened on for inet services whose master.cf line gives no address."),
    _p("inet_protocols", "list", "all", "ipv4, ipv6 or all: address families used for listening and for outbound connections."),
    _p("mynetworks", "list", "127.0.0.0/8, [::1]/128", "Trusted client networks (permit_mynetworks)."),
    # --- master -----------------------------------------------------------------
    _p("default_process_limit", "int", "100", "Default maximal number of processes per service (master.cf maxproc '-')."),
    _p("service_throttle_time", "time", "60s", "How long the master waits before starting a service again after a child failed at start-up."),
    _p("max_use", "int", "100", "Connections per connection slot (max_use x process_connection_limit) a service process handles before it exits and is replaced."),
    _p("max_idle", "time", "100s", "How long an idle service process waits for work before it exits."),
    _p("ipc_timeout", "time", "3600s", "Time limit for a request over an internal Unix socket."),
    _p("daemon_timeout", "time", "18000s", "Watchdog limit for a service process's single task."),
    _p("master_drain_time", "time", "10s", "After SIGTERM, how long children get to finish before they are killed."),
    _p("process_connection_limit", "int", "200", "Concurrent client connections one service process serves before it reports itself busy."),
    _p("listen_backlog", "int", "1024", "Listen queue length of every listening socket."),
    # --- queue and scheduling ----------------------------------------------------------
    _p("queue_run_delay", "time", "300s", "How often qmgr scans the deferred queue."),
    _p("minimal_backoff_time", "time", "300s", "Shortest time a deferred message waits before the next attempt."),
    _p("maximal_backoff_time", "time", "4000s", "Longest time a deferred message waits before the next attempt."),
    _p("maximal_queue_lifetime", "time", "5d", "How long a message may stay queued before it is bounced.", unit="d"),
    _p("bounce_queue_lifetime", "time", "5d", "How long a bounce may stay queued before it is discarded.", unit="d"),
    _p("delay_warning_time", "time", "0h", "After this long in the queue the sender gets a delay warning (0 = never).", unit="h"),
    _p("default_destination_concurrency_limit", "int", "20", "Parallel deliveries per destination per transport."),
    _p("local_destination_concurrency_limit", "int", "2", "Parallel local deliveries per recipient domain."),
    _p("smtp_destination_concurrency_limit", "int", "$default_destination_concurrency_limit", "Parallel smtp deliveries per destination."),
    _p("default_transport_rate_delay", "time", "0s", "Pause between deliveries to the same destination."),
    _p("qmgr_message_active_limit", "int", "20000", "Messages qmgr keeps in the active queue at once."),
    _p("hash_queue_depth", "int", "1", "Levels of hashed subdirectories in the queue."),
    _p("bounce_size_limit", "size", "50000", "Largest original message returned whole in a bounce."),
    _p("bounce_notice_recipient", "str", "postmaster", "Who gets postmaster copies of bounces."),
    _p("notify_classes", "list", "resource, software", "Problem classes reported to the postmaster."),
    # --- cleanup and message limits ------------------------------------------------------
    _p("message_size_limit", "size", "10240000", "Largest message accepted, in bytes (0 = no limit)."),
    _p("header_size_limit", "size", "102400", "Largest header accepted, in bytes."),
    _p("line_length_limit", "int", "2048", "Longest command or header line accepted."),
    _p("always_add_missing_headers", "bool", "no", "Add Date, Message-ID and From to messages from remote clients too."),
    _p("local_header_rewrite_clients", "list", "permit_inet_interfaces", "Clients whose messages get missing headers added."),
    _p("virtual_alias_maps", "list", "", "Address rewriting to other addresses, applied to every recipient (type:name tables)."),
    _p("canonical_maps", "list", "", "Address rewriting applied to sender and recipient addresses and headers."),
    _p("sender_canonical_maps", "list", "", "Address rewriting applied to sender addresses."),
    _p("recipient_canonical_maps", "list", "", "Address rewriting applied to recipient addresses."),
    _p("recipient_delimiter", "str", "+", "Separator between a user name and an address extension (user+ext)."),
    _p("append_dot_mydomain", "bool", "no", "Append .$mydomain to unqualified domains."),
    # --- local delivery -------------------------------------------------------------------
    _p("alias_maps", "list", "texthash:$config_directory/aliases", "Alias tables consulted by the local delivery agent."),
    _p("alias_database", "list", "texthash:$config_directory/aliases", "Alias tables built by newaliases."),
    _p("home_mailbox", "str", "Maildir/", "Mailbox of a system user, relative to the home directory (a trailing / means Maildir)."),
    _p("forward_path", "list", "$home/.forward", "Where the local agent looks for a user's .forward file."),
    _p("allow_mail_to_commands", "list", "alias, forward", "Where |command destinations are allowed."),
    _p("allow_mail_to_files", "list", "alias, forward", "Where /file destinations are allowed."),
    _p("command_time_limit", "time", "1000s", "Time limit for a delivery to a command."),
    _p("mailbox_size_limit", "size", "51200000", "Largest mailbox size in bytes (0 = no limit)."),
    _p("local_recipient_maps", "list", "proxy:unix:passwd.byname $alias_maps", "Known local recipients; others are refused at RCPT."),
    _p("luser_relay", "str", "", "Where mail for unknown local users goes (empty: bounce)."),
    _p("owner_request_special", "bool", "yes", "Send errors for list aliases to their owner- alias."),
    _p("local_command_shell", "str", "", "Shell for |command deliveries (empty: /bin/sh only when the command needs one)."),
    # --- smtpd ------------------------------------------------------------------------------
    _p("smtpd_banner", "str", "$myhostname ESMTP $mail_name", "Text after 220 in the greeting."),
    _p("mail_name", "str", "pymta", "The mail system's name in the greeting and in Received."),
    _p("smtpd_timeout", "time", "300s", "Time limit for a client command or a block of DATA."),
    _p("smtpd_recipient_limit", "int", "1000", "Recipients accepted per message."),
    _p("smtpd_soft_error_limit", "int", "10", "Errors after which each reply is delayed by smtpd_error_sleep_time."),
    _p("smtpd_hard_error_limit", "int", "20", "Errors after which the session is ended."),
    _p("smtpd_error_sleep_time", "time", "1s", "Delay of each reply once the soft error limit is passed."),
    _p("smtpd_client_connection_count_limit", "int", "50", "Simultaneous connections per client address (0 = no limit)."),
    _p("smtpd_client_connection_rate_limit", "int", "0", "Connections per client address per anvil_rate_time_unit (0 = no limit)."),
    _p("anvil_rate_time_unit", "time", "60s", "The time unit of the per-client rate limits."),
    _p("smtpd_client_event_limit_exceptions", "list", "$mynetworks", "Clients exempt from the per-client limits."),
    _p("smtpd_forbid_bare_newline", "bool", "yes", "Reject a bare LF or CR in SMTP commands and message content."),
    _p("smtpd_forbid_bare_newline_exclusions", "list", "$mynetworks", "Clients exempt from smtpd_forbid_bare_newline."),
    _p("disable_vrfy_command", "bool", "yes", "Refuse the VRFY command."),
    _p("smtpd_helo_required", "bool", "no", "Require HELO or EHLO before MAIL."),
    _p("smtpd_helo_restrictions", "list", "", "Restrictions applied to HELO/EHLO."),
    _p("smtpd_client_restrictions", "list", "", "Restrictions applied when a client connects."),
    _p("smtpd_sender_restrictions", "list", "", "Restrictions applied to MAIL FROM."),
    _p("smtpd_relay_restrictions", "list", "permit_mynetworks, permit_sasl_authenticated, defer_unauth_destination", "Relay control applied to RCPT TO."),
    _p("smtpd_recipient_restrictions", "list", "reject_unlisted_recipient", "Restrictions applied to RCPT TO after the relay restrictions."),
    _p("smtpd_data_restrictions", "list", "", "Restrictions applied to DATA."),
    _p("relay_domains", "list", "", "Domains this host relays mail to (backup MX, filtering gateway)."),
    _p("smtpd_tls_security_level", "str", "may", "none, may (offer STARTTLS) or encrypt (require it)."),
    _p("smtpd_tls_cert_file", "str", "$config_directory/tls/cert.pem", "Server certificate (PEM, with chain)."),
    _p("smtpd_tls_key_file", "str", "$config_directory/tls/key.pem", "Server private key (PEM)."),
    _p("smtpd_tls_protocols", "str", ">=TLSv1.2", "TLS protocol versions offered."),
    _p("smtpd_tls_wrappermode", "bool", "no", "Implicit TLS (submissions, port 465)."),
    _p("smtpd_sasl_auth_enable", "bool", "no", "Offer SMTP AUTH."),
    _p("smtpd_tls_auth_only", "bool", "yes", "Offer AUTH only after STARTTLS."),
    _p("smtpd_sender_login_maps", "list", "", "Which login may use which sender address (empty: own address and aliases)."),
    _p("smtpd_reject_unlisted_recipient", "bool", "yes", "Refuse unknown recipients in local and virtual domains at RCPT."),
    _p("smtpd_delay_reject", "bool", "yes", "Apply client, HELO and sender restrictions at RCPT TO."),
    _p("auth_failure_limit", "int", "5", "Failed logins per client address after which the address is refused for auth_failure_penalty_time."),
    _p("auth_failure_penalty_time", "time", "300s", "How long a client is refused after too many failed logins."),
    _p("smtpd_forbid_unauth_pipelining", "bool", "yes", "End the session of a client that sends commands ahead of time where RFC 2920 does not allow it (after EHLO, HELO, NOOP, VRFY, DATA, or before the greeting)."),
    _p("strict_rfc821_envelopes", "bool", "no", "Require <> around the addresses of MAIL FROM and RCPT TO."),
    _p("smtpd_peername_lookup", "bool", "yes", "Look up the client name in DNS (PTR, confirmed by A/AAAA); no: every client is 'unknown'. Loopback clients are 'localhost' without a lookup."),
    _p("smtpd_dns_timeout", "time", "5s", "Time limit for one DNS lookup by smtpd (client name, reject_unknown_sender_domain)."),
    _p("smtpd_sasl_auth_required", "bool", "no", "Refuse MAIL FROM with 530 5.7.0 until the client has authenticated (RFC 4954; the submission services)."),
    _p("reject_code", "int", "554", "Reply code of the reject restriction."),
    _p("defer_code", "int", "450", "Reply code of the defer restriction and of DEFER in access tables."),
    _p("relay_domains_reject_code", "int", "554", "Reply code of reject_unauth_destination."),
    _p("access_map_reject_code", "int", "554", "Reply code of REJECT in check_*_access tables."),
    _p("non_fqdn_reject_code", "int", "504", "Reply code of reject_non_fqdn_sender, reject_non_fqdn_recipient and reject_non_fqdn_helo_hostname."),
    _p("invalid_hostname_reject_code", "int", "501", "Reply code of reject_invalid_helo_hostname."),
    _p("unknown_address_reject_code", "int", "450", "Reply code of reject_unknown_sender_domain and reject_unknown_recipient_domain when the domain has no MX, A or AAAA record (DNS failures always give 450)."),
    _p("unknown_local_recipient_reject_code", "int", "550", "Reply code for unknown recipients in $mydestination (reject_unlisted_recipient)."),
    _p("unknown_virtual_mailbox_reject_code", "int", "550", "Reply code for unknown recipients in $virtual_mailbox_domains (reject_unlisted_recipient)."),
    _p("login_trusted_networks", "list", "127.0.0.1/32, [::1]/128", "Clients allowed plaintext logins without TLS (POP3, IMAP)."),
    # --- smtp client -------------------------------------------------------------------------
    _p("relayhost", "str", "", "Send all non-local mail through this host ([host]:port skips the MX lookup)."),
    _p("transport_maps", "list", "", "Per-domain transport overrides (smtp:[host]:port, local:, error:text, discard:)."),
    _p("default_transport", "str", "smtp", "Transport for domains that are not local."),
    _p("smtp_tcp_port", "int", "25", "TCP port used towards MX hosts."),
    _p("dns_resolver", "str", "", "address[:port] of the DNS resolver to use (empty: /etc/resolv.conf)."),
    _p("smtp_helo_name", "str", "$myhostname", "Name sent in EHLO/HELO."),
    _p("smtp_connect_timeout", "time", "30s", "Time limit for connecting to a remote server."),
    _p("smtp_helo_timeout", "time", "300s", "Time limit for the greeting and the EHLO reply."),
    _p("smtp_mail_timeout", "time", "300s", "Time limit for the MAIL FROM reply."),
    _p("smtp_rcpt_timeout", "time", "300s", "Time limit for the RCPT TO reply."),
    _p("smtp_data_init_timeout", "time", "120s", "Time limit for the DATA reply."),
    _p("smtp_data_xfer_timeout", "time", "180s", "Time limit for sending a block of content."),
    _p("smtp_data_done_timeout", "time", "600s", "Time limit for the reply after the end of data."),
    _p("smtp_quit_timeout", "time", "300s", "Time limit for the QUIT reply."),
    _p("smtp_tls_security_level", "str", "may", "none, may, encrypt, verify or secure."),
    _p("smtp_tls_CAfile", "str", "", "CA certificates used to verify remote servers."),
    _p("smtp_tls_protocols", "str", ">=TLSv1.2", "TLS protocol versions the smtp client accepts (smtpd_tls_protocols syntax; never below TLSv1.2)."),
    _p("smtp_sasl_auth_enable", "bool", "no", "Authenticate to the relay host."),
    _p("smtp_sasl_password_maps", "list", "", "host or [host]:port -> user:password for SMTP AUTH to relays."),
    _p("smtp_connection_cache_time_limit", "time", "2s", "How long an idle outbound connection is kept for reuse."),
    _p("smtp_dns_timeout", "time", "10s", "Time limit for one DNS query."),
    _p("smtp_address_preference", "str", "any", "Address family tried first when a mail host has IPv4 and IPv6 addresses: any (random), ipv4 or ipv6."),
    _p("smtp_starttls_timeout", "time", "300s", "Time limit for the TLS handshake after STARTTLS."),
    _p("smtp_rset_timeout", "time", "20s", "Time limit for the RSET reply that checks a kept connection before it is reused."),
    _p("smtp_mx_address_limit", "int", "5", "Server addresses tried per delivery, over all MX hosts together."),
    _p("smtp_mx_session_limit", "int", "2", "Servers that answer but fail the session (greeting, EHLO, TLS, AUTH) tried per delivery."),
    _p("smtp_sasl_security_options", "list", "noplaintext, noanonymous", "SASL restrictions on connections without TLS: noplaintext forbids AUTH PLAIN and LOGIN there."),
    _p("smtp_sasl_tls_security_options", "list", "noanonymous", "SASL restrictions on TLS connections (AUTH PLAIN and LOGIN allowed unless noplaintext)."),
    _p("smtp_connection_reuse_time_limit", "time", "300s", "A kept outbound connection is not reused once it has been open this long."),
    # --- pop3d / imapd ---------------------------------------------------------------------------
    _p("pop3d_banner", "str", "$mail_name ready.", "Text after +OK in the POP3 greeting."),
    _p("pop3d_timeout", "time", "600s", "Idle time limit of a POP3 session."),
    _p("pop3d_tls_wrappermode", "bool", "no", "Implicit TLS on every connection (the pop3s service, port 995)."),
    _p("imapd_timeout", "time", "1800s", "Idle time limit of an IMAP session."),
    _p("disable_plaintext_auth", "bool", "yes", "Refuse plaintext logins without TLS outside login_trusted_networks."),
]

PARAMS = {p.name: p for p in _TABLE}
if len(PARAMS) != len(_TABLE):
    raise RuntimeError("duplicate parameter declaration in params.py")

# Parameters a service may be given per master.cf line with -o, beyond PARAMS:
# none.  Postfix allows any name there; so do we, but unknown ones are reported.
