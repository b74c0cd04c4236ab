"""`pymta dedup`: exact duplicates (the documented crash window) are removed
with mail-deduplicate's mdedup; different messages are kept."""

import os

from pymta.core import maildir

MSG = (b"From: a@example.org\nTo: bob@test.example\nSubject: twice\n"
       b"Date: Sun, 22 Nov 2026 10:00:00 +0000\nMessage-ID: <1@example.org>\n\nhello\n")


def test_dedup_reports_then_deletes_only_exact_copies(instance):
    instance.pymta("user", "add", "bob@test.example", input="pw\n")
    box = instance.path("mail", "test.example", "bob")
    maildir.deliver(box, MSG)
    maildir.deliver(box, MSG)
    other = maildir.deliver(box, MSG.replace(b"hello", b"different body"))
    assert len(os.listdir(os.path.join(box, "new"))) == 3

    dry = instance.pymta("dedup", "bob@test.example")
    assert "would be deleted" in dry.stdout + dry.stderr
    assert len(os.listdir(os.path.join(box, "new"))) == 3

    instance.pymta("dedup", "--apply", "bob@test.example")
    left = sorted(os.listdir(os.path.join(box, "new")))
    assert len(left) == 2
    assert os.path.basename(other) in left


def test_dedup_unknown_user(instance):
    p = instance.pymta("dedup", "nobody@test.example", check=False)
    assert p.returncode == 67
    assert "unknown user" in p.stderr
