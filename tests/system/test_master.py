"""The master supervisor, driven through `pymta` with a small echo service
(tests/system/programs/echo_service.py) in place of the mail services."""

import os
import pwd
import signal
import socket
import subprocess
import threading
import time

import pytest

from tests.conftest import BIN, make_instance, port_free, run, wait_for

ECHO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "programs", "echo_service.py")


def echo_master_cf(inst, *extra_lines, port_key="smtp", args=""):
    line = f"127.0.0.1:{inst.ports[port_key]} inet n - n - 4 {ECHO} {args}".rstrip()
    inst.write_master_cf("\n".join([line, *extra_lines]) + "\n")


def talk(port, text=b"ping\n", timeout=5):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        f = s.makefile("rwb")
        hello = f.readline()
        f.write(text)
        f.flush()
        answer = f.readline()
        f.write(b"quit\n")
        f.flush()
        return hello, answer


class ConnectLoop(threading.Thread):
    """Connects and talks in a loop, counting refusals and failures."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.port = port
        self.ok = 0
        self.errors = []        # refused connections and wrong answers
        self.cut = 0            # sessions cut short by a killed process
        self.stop_flag = threading.Event()

    def run(self):
        while not self.stop_flag.is_set():
            try:
                hello, answer = talk(self.port)
                if not hello and not answer:
                    self.cut += 1
                elif not hello.startswith(b"hello ") or answer != b"ping\n":
                    self.errors.append(f"bad answer {hello!r} {answer!r}")
                else:
                    self.ok += 1
            except ConnectionRefusedError as e:
                self.errors.append(repr(e))
            except (ConnectionResetError, BrokenPipeError):
                # The session was in the process that kill -9 ended: that
                # connection is lost, but it was accepted, not refused.
                self.cut += 1
            time.sleep(0.01)

    def finish(self):
        self.stop_flag.set()
        self.join(20)


def test_start_status_stop_round_trip(instance):
    echo_master_cf(instance)
    assert instance.pymta("status", check=False).returncode == 1
    instance.start()
    st = instance.pymta("status")
    assert "is running" in st.stdout
    hello, answer = talk(instance.ports["smtp"])
    assert hello.startswith(b"hello ") and answer == b"ping\n"
    second = instance.pymta("start", check=False)
    assert second.returncode != 0
    assert "already running" in second.stderr
    instance.pymta("stop")
    assert instance.pymta("status", check=False).returncode == 1
    assert "daemon started -- version" in instance.log()
    assert f"configuration {instance.etc}" in instance.log()
    assert not instance.master_pid()


def test_port_in_use_is_named_and_nothing_starts(instance):
    echo_master_cf(instance)
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", instance.ports["smtp"]))
    blocker.listen(1)
    try:
        p = instance.pymta("start", check=False)
    finally:
        blocker.close()
    assert p.returncode != 0
    assert f"bind 127.0.0.1 port {instance.ports['smtp']}: Address already in use" in p.stderr
    assert instance.pymta("status", check=False).returncode == 1


def test_children_run_as_mail_owner_with_process_titles(instance):
    # As root (CI) the child drops to mail_owner; otherwise all runs as us.
    expected = "pymta" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
    echo_master_cf(instance)
    instance.start()
    hello, _ = talk(instance.ports["smtp"])
    pid = int(hello.split()[1])
    uid = os.stat(f"/proc/{pid}").st_uid
    assert pwd.getpwuid(uid).pw_name == expected
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        title = f.read().replace(b"\0", b" ").decode()
    assert title.startswith(f"pymta: echo -n 127.0.0.1:{instance.ports['smtp']}")
    assert os.stat(f"/proc/{instance.master_pid()}").st_uid == os.geteuid()
    with open(f"/proc/{instance.master_pid()}/cmdline", "rb") as f:
        assert f.read().replace(b"\0", b" ").decode().startswith(f"pymta: master -c {instance.etc}")


def test_network_service_starts_on_demand(instance):
    echo_master_cf(instance)
    instance.start()
    time.sleep(0.5)
    assert instance.children() == []
    talk(instance.ports["smtp"])
    assert len(instance.children()) == 1


def test_kill_9_child_is_replaced_without_refused_connections(instance):
    echo_master_cf(instance)
    instance.start()
    hello, _ = talk(instance.ports["smtp"])
    first = int(hello.split()[1])
    loop = ConnectLoop(instance.ports["smtp"])
    loop.start()
    wait_for(lambda: loop.ok > 5, what="connect loop running")
    os.kill(first, signal.SIGKILL)
    instance.wait_log(f"pid {first} killed by signal 9")
    before = loop.ok
    wait_for(lambda: loop.ok > before + 20, what="connections after the kill")
    loop.finish()
    assert loop.errors == []
    assert loop.cut <= 1        # at most the session the killed process held
    hello, _ = talk(instance.ports["smtp"])
    assert int(hello.split()[1]) != first


def test_reload_keeps_listening_and_adds_new_listener(instance):
    echo_master_cf(instance)
    instance.start()
    loop = ConnectLoop(instance.ports["smtp"])
    loop.start()
    wait_for(lambda: loop.ok > 5, what="connect loop running")
    new_port = instance.ports["pop3"]
    assert port_free(new_port)
    echo_master_cf(instance, f"127.0.0.1:{new_port} inet n - n - 2 {ECHO}")
    for _ in range(3):
        instance.pymta("reload")
        before = loop.ok
        wait_for(lambda: loop.ok > before + 10, what="connections after reload")
    loop.finish()
    assert loop.errors == []
    assert loop.cut == 0        # a reload drains sessions, it cuts none
    instance.wait_log("reload -- version")
    hello, answer = talk(new_port)
    assert answer == b"ping\n"


def test_child_dying_at_start_throttles_the_service(instance):
    echo_master_cf(instance, args="fail-at-start")
    instance.start()
    with socket.create_connection(("127.0.0.1", instance.ports["smtp"]), timeout=5) as s:
        instance.wait_log("bad command startup -- throttling")
        s.settimeout(0.5)
        with pytest.raises(socket.timeout):
            s.recv(10)
    assert "asked to fail at start" in instance.log()


def test_max_use_and_max_idle(instance):
    port = instance.ports["smtp"]
    # One connection slot per process: max_use=3 means three connections.
    inst_line = (f"127.0.0.1:{port} inet n - n - 4 {ECHO} -o max_use=3 -o max_idle=2"
                 " -o process_connection_limit=1")
    instance.write_master_cf(inst_line + "\n")
    instance.start()
    pids = [int(talk(port)[0].split()[1]) for _ in range(3)]
    assert len(set(pids)) == 1
    wait_for(lambda: instance.children() == [], what="process to leave after max_use")
    fresh = int(talk(port)[0].split()[1])
    assert fresh != pids[0]
    wait_for(lambda: instance.children() == [], timeout=10, what="process to leave after max_idle")


def test_children_exit_when_master_is_killed(instance):
    echo_master_cf(instance)
    instance.start()
    hello, _ = talk(instance.ports["smtp"])
    child = int(hello.split()[1])
    os.kill(instance.master_pid(), signal.SIGKILL)

    def gone():
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{child}/stat") as f:
            return f.read().split(")")[1].split()[0] == "Z"
    wait_for(gone, what="child to exit after the master died")


def test_stop_drains_connected_clients(instance):
    echo_master_cf(instance)
    instance.start()
    s = socket.create_connection(("127.0.0.1", instance.ports["smtp"]), timeout=5)
    f = s.makefile("rwb")
    assert f.readline().startswith(b"hello")
    stopper = subprocess.Popen([os.path.join(BIN, "pymta"), "-c", instance.etc, "stop"])
    time.sleep(0.5)
    # The open session still works while the master drains it.
    f.write(b"still here\n")
    f.flush()
    assert f.readline() == b"still here\n"
    f.write(b"quit\n")
    f.flush()
    s.close()
    assert stopper.wait(30) == 0
    assert instance.pymta("status", check=False).returncode == 1


def test_foreground_logs_to_stderr_and_stops_on_sigterm(instance):
    echo_master_cf(instance)
    p = subprocess.Popen([os.path.join(BIN, "pymta"), "-c", instance.etc, "start", "--foreground"],
                         stderr=subprocess.PIPE)
    try:
        wait_for(instance.master_pid, what="foreground master")
        assert instance.master_pid() == p.pid
        talk(instance.ports["smtp"])
        p.send_signal(signal.SIGTERM)
        err = p.communicate(timeout=30)[1].decode()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0
    assert "pymta/master: daemon started" in err
    assert "pymta/master: terminating on signal 15" in err


def test_ipv6_and_all_interfaces_listeners(instance):
    v6 = instance.ports["smtp"]
    every = instance.ports["pop3"]
    instance.write_master_cf(f"[::1]:{v6} inet n - n - 2 {ECHO}\n"
                             f"{every} inet n - n - 2 {ECHO} -o inet_interfaces=loopback-only\n")
    instance.start()
    with socket.create_connection(("::1", v6), timeout=5) as s:
        assert s.makefile("rb").readline().startswith(b"hello ")
    # A bare port listens on inet_interfaces for both families.
    for host in ("127.0.0.1", "::1"):
        with socket.create_connection((host, every), timeout=5) as s:
            assert s.makefile("rb").readline().startswith(b"hello ")
