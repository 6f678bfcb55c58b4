"""Issue 11: no way around the safeguards, closed to other local users by default.

::

    bind check      the broker accepts only address forms we understand, then asks
                    the kernel what it really listens on before serving (endpoint.py)
    default keys    a tcp:// cluster is keyed with the user's own credentials, made on first
                    use under $XDG_CONFIG_HOME/distfork (conftest: a directory of the test
                    session); another local user (made with useradd, run through
                    as_user.py) is refused, and a squatter's broker gets no worker of ours
    roles           keys admitted as clients cannot register as workers, and the reverse

Every process is started through the CLI, as users run them (secsupport.Procs),
inside a network namespace of its own where a test binds beyond loopback.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import distfork
from conftest import free_port, wait_until
from distfork.status import query_status

from .secsupport import PY, Netns, Procs, keygen, netns_unavailable, run_cli

WRONG_KEY = "the broker's public key we were given is wrong"
AS_USER = str(Path(__file__).with_name("as_user.py"))

pytestmark = pytest.mark.timeout(120)

NO_DEFAULT_KEYS = {"DISTFORK_DEFAULT_KEYS": "0"}  # a broker without any keys: what the bind check guards


@pytest.fixture
def netns() -> Iterator[Netns]:
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    ns = Netns()
    try:
        yield ns
    finally:
        ns.delete()


def _nothing_listens(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


# -- the bind check -------------------------------------------------------------------------------


@pytest.mark.parametrize("bind", [
    "tcp://127.0.0.1:0;0.0.0.0:{port}",  # libzmq binds the part after ';': every interface
    "tcp://127.0.0.1:1;127.0.0.1:{port}",
    "tcp://localhost@x:{port}",
    "tcp://::1:{port}",
    "ipc://@distfork-{port}",  # an abstract socket: no file permissions, any local user connects
])
def test_broker_refuses_address_forms_it_does_not_understand(bind: str) -> None:
    port = free_port()
    address = bind.format(port=port)
    done = run_cli("broker", "--bind", address, timeout_s=30, **NO_DEFAULT_KEYS)  # old brokers served: timeout
    assert done.returncode == 2, done
    assert f"cannot bind {address!r}" in done.stderr, done.stderr
    assert "tcp://HOST:PORT" in done.stderr or "ipc://PATH" in done.stderr, done.stderr
    assert _nothing_listens(port)


def test_an_interface_named_like_a_loopback_host_is_judged_by_what_it_binds(netns: Netns) -> None:
    # libzmq binds the address of an interface whose name is the host; /etc/hosts says localhost is 127.0.0.1.
    netns.ip("link", "add", "localhost", "type", "veth", "peer", "name", "lh-peer")
    netns.ip("addr", "add", "10.213.9.1/24", "dev", "localhost")
    netns.ip("link", "set", "localhost", "up")
    address = f"tcp://localhost:{free_port()}"
    done = run_cli("broker", "--bind", address, prefix=netns.prefix, timeout_s=30, **NO_DEFAULT_KEYS)
    assert done.returncode == 1, done
    assert f"refusing to bind {address} without keys: the broker listens on 10.213.9.1:" in done.stderr, done.stderr
    assert "--insecure" in done.stderr and "distfork keygen" in done.stderr


def test_metrics_host_is_checked_by_form_and_by_what_it_binds(netns: Netns) -> None:
    bind = f"tcp://127.0.0.1:{free_port()}"
    done = run_cli("broker", "--bind", bind, "--metrics-port", "0", "--metrics-host", "127.0.0.1;0.0.0.0",
                   prefix=netns.prefix, timeout_s=30, **NO_DEFAULT_KEYS)
    assert done.returncode == 2 and "--metrics-host '127.0.0.1;0.0.0.0'" in done.stderr, done
    done = run_cli("broker", "--bind", bind, "--metrics-port", "0", "--metrics-host", "0.0.0.0",
                   prefix=netns.prefix, timeout_s=30, **NO_DEFAULT_KEYS)
    assert done.returncode == 1, done
    assert "without keys: the broker listens on 0.0.0.0:" in done.stderr, done.stderr


def _serves(address: str, prefix: tuple[str, ...] = (), **env: str) -> bool:
    return run_cli("status", "--address", address, "--timeout", "1", prefix=prefix, **env).returncode == 0


def test_up_insecure_passes_insecure_to_its_broker(procs: Procs, netns: Netns) -> None:
    port = free_port()
    up = procs.distfork("up", "--workers", "1", "--insecure", "--bind", f"tcp://0.0.0.0:{port}", prefix=netns.prefix,
                        DISTFORK_INSECURE="1")
    wait_until(lambda: _serves(f"tcp://127.0.0.1:{port}", netns.prefix, DISTFORK_INSECURE="1") or up.poll() is not None,
               60, what="`distfork up --insecure` to serve")
    assert up.poll() is None, procs.stderr(up)
    assert "INSECURE: broker bound to tcp://0.0.0.0" in procs.stderr(up)
    assert procs.stop(up) == 0


def test_up_serves_an_ipv6_loopback_address(procs: Procs) -> None:
    address = f"tcp://[::1]:{free_port()}"
    up = procs.distfork("up", "--workers", "1", "--bind", address)
    wait_until(lambda: _serves(address) or up.poll() is not None, 60, what="`distfork up` on [::1] to serve")
    assert up.poll() is None, procs.stderr(up)
    assert "Traceback" not in procs.stderr(up)
    assert procs.stop(up) == 0


# -- closed to other local users by default --------------------------------------------------------


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: str

    def prefix(self) -> tuple[str, ...]:
        return (PY, AS_USER, str(self.uid), str(self.gid), self.home)


@pytest.fixture(scope="module")
def other_user() -> Iterator[User]:
    """A second local user, made for these tests and deleted afterwards (root only)."""
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("needs root and useradd(8) to make a second local user")
    name = f"dfsec{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True,
                   capture_output=True, timeout=30)
    home = tempfile.mkdtemp(prefix="distfork-other-user-")
    try:
        pw = pwd.getpwnam(name)
        os.chown(home, pw.pw_uid, pw.pw_gid)
        yield User(name, pw.pw_uid, pw.pw_gid, home)
    finally:
        subprocess.run(["userdel", name], capture_output=True, timeout=30)
        shutil.rmtree(home, ignore_errors=True)


def _default_env(procs: Procs) -> dict[str, str]:
    """Our own processes: this test session's default credentials (conftest's XDG_CONFIG_HOME), no other keys."""
    env = {k: v for k, v in procs.env.items() if not k.startswith(("DISTFORK_CURVE", "DISTFORK_KEYS_DIR"))}
    env.pop("DISTFORK_INSECURE", None)
    env["DISTFORK_DEFAULT_KEYS"] = "1"  # Procs would start processes with none at all
    return env


def _wait_ready(address: str, workers: int) -> None:
    from distfork.status import query_status

    def ready() -> bool:
        try:
            return len(query_status(address, 0.5)["workers"]) >= workers
        except TimeoutError:
            return False

    wait_until(ready, 30, what=f"the broker at {address} with {workers} workers")


def test_default_credentials_are_private_and_found_by_every_role_of_the_user(procs: Procs) -> None:
    env = _default_env(procs)
    address = f"tcp://127.0.0.1:{free_port()}"
    procs.start(PY, "-m", "distfork", "broker", "--bind", address, env=env)
    procs.start(PY, "-m", "distfork", "worker", "--connect", address, "--no-nanny", env=env)
    _wait_ready(address, 1)  # status, in this process: found the same keys
    keys = Path(os.environ["XDG_CONFIG_HOME"]) / "distfork"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    for role in ("broker", "worker", "client"):
        assert stat.S_IMODE((keys / f"{role}.key_secret").stat().st_mode) == 0o600
    distfork.init(address=address)
    assert distfork.wait(distfork.fork(pow, 6, 2), timeout=30) == 36
    distfork.shutdown()
    # The broker is keyed: a client without keys gets nothing.
    assert run_cli("status", "--address", address, "--timeout", "1").returncode == 1


def test_another_local_user_is_refused_and_runs_nothing(procs: Procs, other_user: User, tmp_path: Path) -> None:
    env = _default_env(procs)
    address = f"tcp://127.0.0.1:{free_port()}"
    procs.start(PY, "-m", "distfork", "broker", "--bind", address, env=env)
    procs.start(PY, "-m", "distfork", "worker", "--connect", address, "--no-nanny", env=env)
    _wait_ready(address, 1)
    marker = Path(other_user.home) / "ran-as-root"
    driver = subprocess.run([*other_user.prefix(), "driver", address, str(marker)], env=env, capture_output=True,
                            text=True, timeout=60)
    assert driver.returncode == 3, (driver.stdout, driver.stderr)  # as_user.REFUSED_EXIT
    # Their own default keys: the broker's key they expect is theirs, not ours (and ours would refuse theirs).
    assert "REFUSED AuthenticationError" in driver.stdout and WRONG_KEY in driver.stdout, driver.stdout
    status = subprocess.run([*other_user.prefix(), "cli", "status", "--address", address, "--timeout", "3"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert status.returncode == 1 and WRONG_KEY in status.stderr, status
    assert not marker.exists(), "another local user ran a task on our worker"


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may create files in, as /tmp (mode 1777)."""
    path = Path(tempfile.mkdtemp(prefix="distfork-shared-"))
    path.chmod(0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_a_worker_never_serves_a_broker_squatting_its_port(
    procs: Procs, other_user: User, shared_dir: Path, transport: str,
) -> None:
    env = _default_env(procs)
    if transport == "tcp":
        address = f"tcp://127.0.0.1:{free_port()}"
    else:  # a path in a directory anyone can write, like /tmp: whoever binds first owns it
        address = f"ipc://{shared_dir}/broker"
    marker = Path(other_user.home) / "ran-as-root"
    squatter = procs.start(*other_user.prefix(), "cli", "broker", "--bind", address, env=env)

    def listening() -> bool:
        if transport == "ipc":
            return (shared_dir / "broker").exists()
        return not _nothing_listens(int(address.rsplit(":", 1)[1]))

    wait_until(lambda: listening() or squatter.poll() is not None, 30, what="the other user's broker to listen")
    assert squatter.poll() is None, procs.stderr(squatter)
    driver = procs.start(*other_user.prefix(), "driver", address, str(marker), env=env)
    worker = procs.start(PY, "-m", "distfork", "worker", "--connect", address, "--no-nanny", env=env)
    assert worker.wait(60) == 78, procs.stderr(worker)  # security.EXIT_REFUSED: not restarted by a nanny
    assert WRONG_KEY in procs.stderr(worker)
    procs.stop(driver)
    assert not marker.exists(), "our worker ran the squatter's task"


# -- keys bound to a role -----------------------------------------------------------------------


def test_a_client_key_cannot_register_as_a_worker_nor_a_worker_key_as_a_driver(
    procs: Procs, tmp_path: Path,
) -> None:
    keys = keygen(tmp_path / "keys")
    address = f"tcp://127.0.0.1:{free_port()}"
    procs.distfork("broker", "--bind", address, keys=keys)
    worker = procs.distfork("--curve-secret-file", str(keys / "client.key_secret"), "--curve-server-key",
                            str(keys / "broker.key"), "worker", "--connect", address, "--no-nanny")
    assert worker.wait(60) == 78, procs.stderr(worker)
    assert "admitted as client, not as a worker" in procs.stderr(worker)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTFORK_KEYS_DIR", str(keys))
        _wait_ready(address, 0)
        assert query_status(address, 5)["workers"] == []  # never registered
    with pytest.raises(distfork.AuthenticationError, match="admitted as worker, not as a client"):
        distfork.init(address, curve_secret_file=str(keys / "worker.key_secret"),
                      curve_server_key=str(keys / "broker.key"))
    # The right keys for each role work.
    procs.distfork("worker", "--connect", address, "--no-nanny", keys=keys)
    distfork.init(address, keys_dir=str(keys))
    assert distfork.wait(distfork.fork(pow, 2, 10), timeout=30) == 1024


def test_the_old_single_allow_list_gets_a_migration_error(tmp_path: Path) -> None:
    keys = keygen(tmp_path / "keys")
    old = tmp_path / "old-allowed"
    old.mkdir(mode=0o700)
    shutil.copy(keys / "client.key", old / "client.key")
    done = run_cli("--curve-secret-file", str(keys / "broker.key_secret"), "--curve-allow-dir", str(old),
                   "broker", "--bind", f"tcp://127.0.0.1:{free_port()}", timeout_s=30)
    assert done.returncode == 1, done
    assert "old layout" in done.stderr and "clients/" in done.stderr and "workers/" in done.stderr, done.stderr


# -- key files --------------------------------------------------------------------------------------

# Watches DIR/0 .. DIR/N-1 for secret key files and reports any mode that lets others in, however briefly.
WATCHER = r"""
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
names = [os.path.join(root, str(i), f"{r}.key_secret") for i in range(n) for r in ("broker", "worker", "client")]
seen = set()
print("ready", flush=True)
while not os.path.exists(os.path.join(root, "done")):
    for path in names:
        try:
            mode = os.stat(path).st_mode & 0o777
        except OSError:
            continue
        if mode & 0o077:
            seen.add(f"{path} {mode:o}")
print("\n".join(sorted(seen)), flush=True)
"""


def test_keygen_never_shows_a_secret_key_to_others_even_for_a_moment(tmp_path: Path) -> None:
    from distfork.security import keygen as make_keys

    root = tmp_path / "race"
    root.mkdir()
    n = 40
    watcher = subprocess.Popen([PY, "-c", WATCHER, str(root), str(n)], stdout=subprocess.PIPE, text=True)
    try:
        assert watcher.stdout is not None and watcher.stdout.readline() == "ready\n"
        old = os.umask(0o022)  # the common umask: new files 0644 unless made private from the start
        try:
            for i in range(n):
                make_keys(str(root / str(i)))
        finally:
            os.umask(old)
        (root / "done").touch()
        out, _ = watcher.communicate(timeout=30)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    assert out.strip() == "", f"secret keys readable by others for a moment:\n{out}"
    for i in range(n):
        assert stat.S_IMODE((root / str(i)).stat().st_mode) == 0o700
        assert stat.S_IMODE((root / str(i) / "client.key_secret").stat().st_mode) == 0o600


def test_every_role_refuses_key_files_others_can_read_naming_the_fix(procs: Procs, tmp_path: Path) -> None:
    keys = keygen(tmp_path / "keys")
    address = f"tcp://127.0.0.1:{free_port()}"
    (keys / "broker.key_secret").chmod(0o644)
    broker = run_cli("broker", "--bind", address, keys=keys, timeout_s=30)
    assert broker.returncode == 1, broker
    assert f"{keys / 'broker.key_secret'} is readable by other users" in broker.stderr, broker.stderr
    assert f"chmod 600 {keys / 'broker.key_secret'}" in broker.stderr
    (keys / "broker.key_secret").chmod(0o600)
    (keys / "worker.key_secret").chmod(0o604)
    worker = run_cli("worker", "--connect", address, "--no-nanny", keys=keys, timeout_s=30)
    assert worker.returncode == 1 and f"chmod 600 {keys / 'worker.key_secret'}" in worker.stderr, worker
    (keys / "client.key_secret").chmod(0o666)
    with pytest.raises(ValueError, match=r"client.key_secret is readable and writable by other users .*chmod 600"):
        distfork.init(address, keys_dir=str(keys))
    (keys / "allowed" / "workers").chmod(0o777)
    broker = run_cli("broker", "--bind", address, keys=keys, timeout_s=30)
    assert broker.returncode == 1, broker
    assert f"{keys / 'allowed' / 'workers'} is writable by other users" in broker.stderr, broker.stderr
    assert f"chmod 700 {keys / 'allowed' / 'workers'}" in broker.stderr


def test_an_allow_list_of_star_is_refused(tmp_path: Path) -> None:
    keys = keygen(tmp_path / "keys")
    done = run_cli("--curve-secret-file", str(keys / "broker.key_secret"), "--curve-allow-dir", "*",
                   "broker", "--bind", f"tcp://127.0.0.1:{free_port()}", timeout_s=30)
    assert done.returncode == 1, done  # pyzmq reads '*' as "admit every key"
    assert "refusing the allow-list '*'" in done.stderr, done.stderr


# -- smaller ones ---------------------------------------------------------------------------------------


def test_an_ipc_socket_is_private_whatever_the_umask(procs: Procs, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    path = shared / "broker"
    broker = procs.start("sh", "-c", f'umask 000 && exec "{PY}" -m distfork broker --bind ipc://{path}')
    wait_until(lambda: path.exists() or broker.poll() is not None, 30, what="the ipc socket")
    assert broker.poll() is None, procs.stderr(broker)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


DRIVER = """
import distfork
print(distfork.wait(distfork.fork(sum, [1, 2, 3])), flush=True)
"""


def test_the_cluster_never_imports_from_the_drivers_working_directory(procs: Procs, tmp_path: Path) -> None:
    shared = tmp_path / "shared"  # e.g. /tmp: someone else left a click.py there
    shared.mkdir()
    planted = tmp_path / "planted-ran"
    (shared / "click.py").write_text(f"open({str(planted)!r}, 'w').close()\nraise ImportError('planted')\n")
    script = tmp_path / "mine" / "driver.py"
    script.parent.mkdir()
    script.write_text(DRIVER)
    env = {**procs.env, "DISTFORK_LOCAL_WORKERS": "1"}
    done = subprocess.run([PY, str(script)], cwd=shared, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "6", done
    assert not planted.exists(), "a module from the driver's working directory ran in the cluster"


# -- memory before authentication ----------------------------------------------------------------


def _flood(host: str, port: int, declared: int, seconds: float, sent: list[int]) -> None:
    """A peer that offers CURVE, then a command frame declaring ``declared`` bytes, and streams zeros."""
    import struct
    import time

    greeting = b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"CURVE".ljust(20, b"\0") + b"\0" * 32
    chunk = b"\0" * (1 << 20)
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(greeting)
        s.recv(64)
        s.sendall(bytes([0x06]) + struct.pack("!Q", declared))  # command | long frame
        end = time.monotonic() + seconds
        try:
            while time.monotonic() < end:
                s.sendall(chunk)
                sent.append(len(chunk))
        except OSError:
            pass  # the broker closed the connection: what we want


def test_unauthenticated_peers_cannot_make_the_broker_hold_memory(procs: Procs, tmp_path: Path) -> None:
    import threading

    import psutil

    keys = keygen(tmp_path / "keys")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    broker = procs.distfork("broker", "--bind", address, keys=keys)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTFORK_KEYS_DIR", str(keys))
        _wait_ready(address, 0)
    rss = psutil.Process(broker.pid).memory_info().rss
    peak = rss
    sent: list[int] = []
    peers = [threading.Thread(target=_flood, args=("127.0.0.1", port, 1 << 30, 3.0, sent)) for _ in range(3)]
    for t in peers:
        t.start()
    while any(t.is_alive() for t in peers):
        peak = max(peak, psutil.Process(broker.pid).memory_info().rss)
    for t in peers:
        t.join()
    grown_mib = (peak - rss) / 2**20
    assert grown_mib < 150, f"the broker grew by {grown_mib:.0f} MiB for three peers that never authenticated"
    assert broker.poll() is None
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTFORK_KEYS_DIR", str(keys))
        _wait_ready(address, 0)  # and it still serves


def test_large_arrays_still_cross_hosts_as_frames(procs: Procs, tmp_path: Path) -> None:
    import numpy as np

    keys = keygen(tmp_path / "keys")
    address = f"tcp://127.0.0.1:{free_port()}"
    procs.distfork("broker", "--bind", address, keys=keys)
    procs.distfork("worker", "--connect", address, "--no-nanny", keys=keys, DISTFORK_SHM="0")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTFORK_KEYS_DIR", str(keys))
        _wait_ready(address, 1)
    distfork.init(address, keys_dir=str(keys), shm=False)
    a = np.random.default_rng(0).random(100 * 2**20 // 8)  # 100 MiB, 6+ frames each way
    back = distfork.wait(distfork.fork(np.multiply, a, 2.0), timeout=120)
    np.testing.assert_array_equal(back, a * 2.0)


def test_default_keys_that_cannot_be_made_give_a_clear_error(tmp_path: Path) -> None:
    done = run_cli("status", "--address", f"tcp://127.0.0.1:{free_port()}", "--timeout", "1",
                   XDG_CONFIG_HOME="/dev/null/config", DISTFORK_DEFAULT_KEYS="1")
    assert done.returncode == 1, done
    assert "cannot make this user's default keys in /dev/null/config/distfork" in done.stderr, done.stderr
    assert "DISTFORK_KEYS_DIR" in done.stderr and "Traceback" not in done.stderr
