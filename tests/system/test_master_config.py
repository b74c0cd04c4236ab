"""Configuration mistakes stop `pymta start` with FILE:LINE and nothing
starts; the wakeup column sends periodic triggers."""

import os

import pytest

from tests.conftest import wait_for

PROGRAMS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "programs")
ECHO = os.path.join(PROGRAMS, "echo_service.py")
WAKEUPS = os.path.join(PROGRAMS, "trigger_service.py")


def write(inst, name, text):
    with open(os.path.join(inst.etc, name), "w") as f:
        f.write(text)


MISTAKES = {
    "unknown service type": (
        "master.cf", "smtp inet n - n - - {echo}\nfoo fifo n - n - 1 {echo}\n",
        "master.cf:2: unknown service type 'fifo'"),
    "bad maxproc": (
        "master.cf", "127.0.0.1:{port} inet n - n - many {echo}\n",
        "master.cf:1: bad maximal process count 'many'"),
    "bad port": (
        "master.cf", "127.0.0.1:99999 inet n - n - - {echo}\n",
        "master.cf:1: bad port '99999'"),
    "unbalanced expansion": (
        "main.cf", "myhostname = mx.test.example\nmyorigin = ${myhostname\n",
        "main.cf:2: myorigin: unbalanced '{'"),
    "unknown parameter": (
        "main.cf", "myhostname = mx.test.example\n\nmyhostnme = typo.example\n",
        "main.cf:3: unknown parameter 'myhostnme'"),
}


@pytest.mark.parametrize("kind", sorted(MISTAKES))
def test_configuration_mistake_stops_start(instance, kind):
    name, text, message = MISTAKES[kind]
    if name == "master.cf":
        write(instance, name, text.format(echo=ECHO, port=instance.ports["smtp"]))
    else:
        write(instance, "master.cf", f"127.0.0.1:{instance.ports['smtp']} inet n - n - - {ECHO}\n")
        write(instance, name, text)
    p = instance.pymta("start", check=False)
    assert p.returncode != 0
    assert message in p.stderr, p.stderr
    assert os.path.join(instance.etc, name) in p.stderr
    assert instance.pymta("status", check=False).returncode == 1
    assert not instance.master_pid()


def test_wakeup_column_triggers_periodically(instance):
    # mail/ belongs to mail_owner, whom the service runs as under root.
    out = instance.path("mail", "wakeups.txt")
    write(instance, "master.cf", f"wakeups unix n - n 1 1 {WAKEUPS} {out}\n")
    instance.start()

    def count():
        try:
            with open(out, "rb") as f:
                return f.read().count(b"W\n")
        except FileNotFoundError:
            return 0
    wait_for(lambda: count() >= 3, timeout=10, what="three wake-ups")
    assert len(instance.children()) == 1
