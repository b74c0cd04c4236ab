"""qmgr/bounce - non-delivery, delay and postmaster notifications.

The queue manager turns the bounce log of a message into one RFC 3464
report (pymta.core.dsn.make_dsn) and queues it like any other mail:

  - to the envelope sender, from the null sender <>, honouring the
    recipients' NOTIFY and the message's RET and ENVID;
  - a message from <> (a bounce that could not be delivered) never
    bounces back: its report goes to the postmaster (bounce_notice_recipient)
    as a "Postmaster Copy" with the original's headers only, from the
    double-bounce address, as Postfix does;
  - mail from the double-bounce address that fails is dropped with a log
    line: notifications never loop;
  - with `bounce` in notify_classes the postmaster also gets a copy of
    every ordinary bounce.

Delay warnings go to the sender of a message that is still deferred after
delay_warning_time, once.  Notifications are submitted through the cleanup
library as local mail, so they get the same checks and rewriting as every
other message.  Each function returns nothing and logs what it queued:

    QID: sender non-delivery notification: NEWQID
    QID: postmaster non-delivery notification: NEWQID
    QID: sender delay notification: NEWQID

pymta.core.dsn, and with it the email package, is imported inside the
functions that make a notice, not at the top: qmgr runs all the time and
is idle most of it, and those modules would stay in its memory for good.
"""

from pymta.core import log
from pymta.core.cleanup import Cleanup, Origin
from pymta.core.errors import PermFail

DOUBLE_BOUNCE = "double-bounce"
HEADER_SLACK = 4096
_CONTROL = {chr(c) for c in range(32) if c != 9} | {"\x7f"}


def _qualify(address, domain):
    return address if "@" in address else f"{address}@{domain}"


def _notify_set(notify):
    if not notify:
        return None
    return {item.strip().upper() for item in notify.replace(",", " ").split()}


def wants(notify, what):
    """Does a recipient's DSN NOTIFY (None: not given) ask for `what`
    ("FAILURE" or "DELAY")?  Without NOTIFY the default is failures and
    delays, as in RFC 3461."""
    items = _notify_set(notify)
    return items is None or what in items


def _safe_line(value):
    return value if value and not (set(value) & _CONTROL) else None


def _remote_mta(relay):
    """host of 'host[ip]:port' ('' for local, none and empty relays)."""
    if not relay or relay in ("none", "local"):
        return ""
    return relay.split("[", 1)[0].strip()


class Notifier:
    """Makes and queues notifications for one configuration."""

    def __init__(self, cfg, submit):
        """`submit(sender, recipient, content) -> queue_id` queues a
        notification message (the cleanup library)."""
        self.cfg = cfg
        self.submit = submit
        self.double_bounce = f"{DOUBLE_BOUNCE}@{cfg.myorigin}".lower()
        self.postmaster = _qualify(cfg.bounce_notice_recipient, cfg.myorigin)

    def is_notification_sender(self, sender):
        """The null sender or the double-bounce address: mail from these
        never produces a notice to its sender."""
        return sender == "" or sender.lower() == self.double_bounce

    # -- content ------------------------------------------------------------------

    def _original(self, qf, ret, headers_only):
        """The part of the queued message a report needs: all of it for a
        full return, else enough to hold its header."""
        size = qf.content_size
        if headers_only or ret == "HDRS" or size > self.cfg.bounce_size_limit:
            want = max(self.cfg.header_size_limit + HEADER_SLACK, self.cfg.bounce_size_limit + 1)
            if size > want:
                data = b"".join(_take(qf.content_chunks(), want))
                return data
        return qf.read_content()

    def _report(self, kind, qf, recipients, postmaster_copy, to):
        from pymta.core import dsn as dsnlib  # local: see the module docstring
        ret = (qf.attrs.get("ret") or "").upper()
        ret = ret if ret in ("FULL", "HDRS") else None
        original = self._original(qf, ret, postmaster_copy or kind != dsnlib.KIND_BOUNCE)
        return dsnlib.make_dsn(
            kind, sender=qf.sender if _safe_line(qf.sender) else "", queue_id=qf.queue_id,
            recipients=recipients, original_message=original,
            reporting_mta=self.cfg.myhostname, arrival_date=qf.arrival_time,
            ret=ret, envid=_safe_line(qf.attrs.get("envid", "")),
            postmaster_copy=postmaster_copy, to=to,
            bounce_size_limit=self.cfg.bounce_size_limit,
            delay_warning_time=self.cfg.delay_warning_time,
            maximal_queue_lifetime=self.cfg.maximal_queue_lifetime)

    # -- notices ------------------------------------------------------------------

    def bounce(self, qf, entries):
        """Queue the report for bounce log `entries` of the message `qf`.

        OSError and TempFail propagate: the caller keeps the bounce log and
        tries again later.  A report that cannot be made or queued at all
        (ValueError, PermFail: a malformed address) is logged and given
        up."""
        from pymta.core import dsn as dsnlib  # local: see the module docstring
        qid = qf.queue_id
        sender = qf.sender
        if sender.lower() == self.double_bounce:
            log.warning(f"{qid}: undeliverable postmaster notification discarded")
            return
        failed = [_dsn_recipient(e, "failed") for e in entries]
        try:
            if sender == "":
                self._send_postmaster(qf, failed)
                return
            to_sender = [r for r, e in zip(failed, entries) if wants(e.get("notify"), "FAILURE")]
            if to_sender and _safe_line(sender):
                content = self._report(dsnlib.KIND_BOUNCE, qf, to_sender, False, None)
                new = self.submit("", sender, content)
                log.info(f"{qid}: sender non-delivery notification: {new}")
            if "bounce" in [c.lower() for c in self.cfg.notify_classes]:
                self._send_postmaster(qf, failed)
        except (ValueError, PermFail) as e:
            log.warning(f"{qid}: cannot make a non-delivery notification: {e}")

    def _send_postmaster(self, qf, failed):
        from pymta.core import dsn as dsnlib  # local: see the module docstring
        content = self._report(dsnlib.KIND_BOUNCE, qf, failed, True, self.postmaster)
        new = self.submit(self.double_bounce, self.postmaster, content)
        log.info(f"{qf.queue_id}: postmaster non-delivery notification: {new}")

    def delay(self, qf, deferred):
        """Queue a delay warning for `deferred`: (Recipient, dsn, reason)
        triples.  Nothing for notification senders or recipients whose
        NOTIFY excludes DELAY."""
        from pymta.core import dsn as dsnlib  # local: see the module docstring
        sender = qf.sender
        if self.is_notification_sender(sender) or not _safe_line(sender):
            return
        recipients = [dsnlib.DsnRecipient(address=r.address, status=dsn, action="delayed",
                                          reason=reason, original=r.orig or "",
                                          orcpt=r.orcpt or "")
                      for r, dsn, reason in deferred if wants(r.notify, "DELAY")]
        if not recipients:
            return
        try:
            content = self._report(dsnlib.KIND_DELAY, qf, recipients, False, None)
            new = self.submit("", sender, content)
        except (ValueError, PermFail) as e:
            log.warning(f"{qf.queue_id}: cannot make a delay notification: {e}")
            return
        log.info(f"{qf.queue_id}: sender delay notification: {new}")


def _take(chunks, limit):
    got = 0
    for chunk in chunks:
        if got >= limit:
            return
        yield chunk[:limit - got]
        got += len(chunk)


def _dsn_recipient(entry, action):
    from pymta.core import dsn as dsnlib  # local: see the module docstring
    status = entry.get("dsn", "5.0.0")
    if not status[:1] in ("4", "5"):
        status = "5.0.0"
    return dsnlib.DsnRecipient(
        address=entry.get("recipient", ""), status=status, action=action,
        reason=entry.get("reason", ""), original=entry.get("orig", ""),
        orcpt=entry.get("orcpt", ""), remote_mta=_remote_mta(entry.get("relay", "")))



def cleanup_submitter(cfg, queue):
    """submit(sender, recipient, content) -> queue id through the cleanup
    library, as local mail made by pymta itself.  qmgr scans incoming
    after queueing a notice, so cleanup sends no trigger."""
    cleanup = Cleanup(cfg, queue, trigger=False)

    def submit(sender, recipient, content):
        return cleanup.submit(sender, [recipient], content, Origin())
    return submit
