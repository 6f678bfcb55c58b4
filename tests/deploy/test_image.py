"""worker/: the image's Dockerfile (parsed by Docker's own parser, the ``dockerfile`` package) and its
entry point (shellcheck-clean, and run here for real: a broker, a worker and their health checks)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dockerfile
import pytest

from conftest import cli_env, free_port, stop_processes, wait_until
from distfork.cli import cli

from .opsutil import scrape, value

ROOT = Path(__file__).resolve().parents[2]
CONTEXT = ROOT / "worker"
ENTRYPOINT = CONTEXT / "entrypoint.sh"

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def instructions() -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(CONTEXT / "Dockerfile")))


def _one(instructions: list[dockerfile.Command], cmd: str) -> dockerfile.Command:
    found = [i for i in instructions if i.cmd == cmd]
    assert len(found) == 1, (cmd, found)
    return found[0]


def test_one_stage_that_copies_only_what_exists(instructions: list[dockerfile.Command]) -> None:
    assert [i.cmd for i in instructions].count("FROM") == 1
    for i in instructions:
        if i.cmd != "COPY":
            continue
        *sources, _dest = i.value
        base = ROOT if "--from=src" in i.flags else CONTEXT  # "src": the named context, the repository root
        for s in sources:
            assert (base / s).exists(), f"{i.original}: {s} is not in {base}"


def test_runs_as_a_non_root_user(instructions: list[dockerfile.Command]) -> None:
    users = [i for i in instructions if i.cmd == "USER"]
    assert users, "no USER: the container would run as root"
    uid = users[-1].value[0].split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric, so Kubernetes' runAsNonRoot can check it
    entry = _one(instructions, "ENTRYPOINT")
    assert instructions.index(users[-1]) < instructions.index(entry)
    run = _one(instructions, "RUN")
    assert f"--uid {uid}" in run.value[0]  # the user exists in the image


def test_entrypoint_health_check_and_default_role(instructions: list[dockerfile.Command]) -> None:
    assert _one(instructions, "ENTRYPOINT").value == ("distfork-entrypoint",)
    assert _one(instructions, "CMD").value == ("worker",)
    health = _one(instructions, "HEALTHCHECK")
    assert health.value == ("CMD", "distfork-entrypoint", "health")
    copies = [i for i in instructions if i.cmd == "COPY" and "entrypoint.sh" in i.value]
    assert copies and copies[0].value[-1] == "/usr/local/bin/distfork-entrypoint"
    env = {k: v for i in instructions if i.cmd == "ENV" for k, v in zip(i.value[0::2], i.value[1::2], strict=True)}
    assert env["DISTFORK_BIND"] == "tcp://0.0.0.0:7340" and env["DISTFORK_ADDRESS"] == "tcp://broker:7340"
    exposed = {p for i in instructions if i.cmd == "EXPOSE" for p in i.value}
    assert exposed == {"7340", env["DISTFORK_METRICS_PORT"]}


def test_the_entrypoint_is_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    done = subprocess.run([shellcheck, "--shell=sh", "--severity=style", str(ENTRYPOINT)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout
    assert os.access(ENTRYPOINT, os.X_OK)


def test_the_cli_options_the_entrypoint_uses_exist() -> None:
    text = ENTRYPOINT.read_text()
    for command, option in (("broker", "--bind"), ("broker", "--metrics-port"), ("worker", "--connect"),
                            ("status", "--address"), ("status", "--timeout"), ("status", "--expect-worker-host")):
        assert option in text
        assert option in {o for p in cli.commands[command].params for o in p.opts}, (command, option)


# -- the entry point, for real --------------------------------------------------------

class Container:
    """What a container would see: the entry point, its own /tmp, the image's environment."""

    def __init__(self, tmp: Path, **env: str) -> None:
        tmp.mkdir()
        self.env = cli_env(TMPDIR=str(tmp), DISTFORK_HEARTBEAT_S="0.2", DISTFORK_HEALTH_TIMEOUT="1", **env)
        # `distfork` as installed next to this Python (the image's console script)
        self.env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), self.env.get("PATH", "")])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        self.proc = subprocess.Popen([str(ENTRYPOINT), *args], env=self.env, stdin=subprocess.DEVNULL)
        return self.proc

    def health(self) -> int:
        return subprocess.run([str(ENTRYPOINT), "health"], env=self.env, capture_output=True, timeout=30).returncode

    def stop(self) -> None:
        if self.proc is not None:
            stop_processes([self.proc])


@pytest.fixture
def containers(tmp_path: Path) -> Iterator[list[Container]]:
    made: list[Container] = []
    try:
        yield made
    finally:
        for c in reversed(made):
            c.stop()


def test_broker_and_worker_containers_start_and_report_health(tmp_path: Path, containers: list[Container]) -> None:
    port, metrics = free_port(), free_port()
    broker = Container(tmp_path / "broker", DISTFORK_BIND=f"tcp://127.0.0.1:{port}", DISTFORK_METRICS_PORT=str(metrics))
    worker = Container(tmp_path / "worker", DISTFORK_ADDRESS=f"tcp://127.0.0.1:{port}")
    nothing = Container(tmp_path / "nothing")
    containers += [broker, worker]

    assert nothing.health() == 1  # no role started in it
    broker.start("broker")
    wait_until(lambda: broker.health() == 0, 30, interval_s=0.2, what="the broker container to be healthy")
    # the entry point passed DISTFORK_METRICS_PORT on
    assert value(scrape(f"http://127.0.0.1:{metrics}/metrics"), "distfork_workers_alive") == 0

    worker.start("worker", "--no-nanny")
    wait_until(lambda: worker.health() == 0, 30, interval_s=0.2, what="the worker container to be healthy")
    assert value(scrape(f"http://127.0.0.1:{metrics}/metrics"), "distfork_workers_alive") == 1

    worker.stop()
    # the broker answers, without a worker of this host: exit 3 (Kubernetes' liveness probe restarts on it)
    wait_until(lambda: worker.health() == 3, 30, interval_s=0.2, what="the stopped worker to be unhealthy")
    broker.stop()
    assert broker.proc is not None and broker.proc.returncode == 0  # SIGTERM reached distfork through exec
    assert broker.health() == 1 and worker.health() == 1  # nobody answers


def test_other_commands_run_as_given(tmp_path: Path) -> None:
    c = Container(tmp_path / "c")
    done = subprocess.run([str(ENTRYPOINT), "distfork", "--help"], env=c.env, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0 and "loadtest" in done.stdout
