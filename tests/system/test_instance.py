"""A whole default instance: `make run`'s code path, what runs when idle,
and the first message of the README."""

import os
import signal
import smtplib
import subprocess
import time

from tests.conftest import BIN, wait_for


def test_make_run_code_path_answers_smtp(instance):
    # `make run` is `pymta init run` (done by the fixture) then
    # `pymta -c run/etc start --foreground`.
    p = subprocess.Popen([os.path.join(BIN, "pymta"), "-c", instance.etc, "start", "--foreground"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(instance.master_pid, what="master")
        with smtplib.SMTP("127.0.0.1", instance.ports["smtp"], timeout=10) as s:
            code, banner = s.ehlo("client.example")
            assert code == 250
            assert b"mx.test.example" in banner
        p.send_signal(signal.SIGINT)          # Ctrl-C
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert not instance.master_pid()


def test_idle_instance_runs_only_master_qmgr_and_pickup(started):
    wait_for(lambda: len(started.children()) == 2, what="qmgr and pickup")
    time.sleep(1)
    titles = sorted(t.split(" -n")[0] for t in started.process_titles().values())
    assert titles == ["pymta: pickup", "pymta: qmgr"]


def test_readme_first_message(started):
    started.pymta("user", "add", f"you@{started.domain}", input="a password\n")
    subprocess.run([os.path.join(BIN, "sendmail"), "-C", started.etc, f"you@{started.domain}"],
                   input=b"Subject: hello\n\nfirst message\n", check=True, timeout=30)
    new = started.path("mail", started.domain, "you", "new")
    files = wait_for(lambda: os.path.isdir(new) and os.listdir(new), what="delivery")
    with open(os.path.join(new, files[0]), "rb") as f:
        data = f.read()
    assert data.endswith(b"\n\nfirst message\n")
    assert b"Subject: hello\n" in data
    started.wait_log("status=sent (delivered to maildir)")
