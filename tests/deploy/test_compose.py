"""docker-compose.yml: valid by the Compose specification's JSON schema, and wired the way deploy/README.md says.

The schema is the one check-jsonschema ships (``vendor.compose-spec``), so this
runs offline; there is no Docker engine here to run the file itself (the same
topology runs for real in test_multihost.py).
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from distfork.cli import cli

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"


def compose_schema() -> dict[str, Any]:
    import check_jsonschema

    path = Path(check_jsonschema.__file__).parent / "builtin_schemas" / "vendor" / "compose-spec.json"
    return json.loads(path.read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # type: ignore[no-any-return]


def test_the_compose_file_validates_against_the_compose_spec() -> None:
    done = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                           str(COMPOSE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("break_it", [
    lambda c: c["services"]["worker"].update(shm_size=["2gb"]),
    lambda c: c["services"]["broker"].update(ports="7340"),
    lambda c: c["services"]["worker"].update(deploy={"replicaz": 8}),
    lambda c: c["services"]["broker"].update(helthcheck={}),
], ids=["shm_size-list", "ports-string", "misspelt-deploy-key", "misspelt-key"])
def test_the_schema_rejects_a_broken_copy(compose: dict[str, Any], break_it: Any) -> None:
    """The validation above can fail: the same schema refuses these edits of our file."""
    validator = jsonschema.validators.validator_for(compose_schema())(compose_schema())
    assert not list(validator.iter_errors(compose))
    broken = copy.deepcopy(compose)
    break_it(broken)
    assert list(validator.iter_errors(broken))


def _parses(args: list[str]) -> None:
    """``distfork ARGS`` is a valid command line (parsed by the CLI itself, not run)."""
    name, *rest = args
    command = cli.commands[name]
    command.make_context(name, rest)


def _size_bytes(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*([kmg]?)b?", str(text).lower())
    assert m, text
    return int(m[1]) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m[2]]


def test_one_broker_and_scalable_workers_from_one_image(compose: dict[str, Any]) -> None:
    broker, worker = compose["services"]["broker"], compose["services"]["worker"]
    assert set(compose["services"]) == {"broker", "worker"}
    for svc in (broker, worker):
        assert svc["image"] == "distfork:latest"
        assert svc["build"]["context"] == "./worker" and svc["build"]["additional_contexts"] == {"src": "."}
        assert (ROOT / "worker" / "Dockerfile").exists()
        assert svc["environment"]["DISTFORK_KEYS_DIR"] == "/keys"
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"]
        assert "no-new-privileges:true" in svc["security_opt"]
        assert svc["healthcheck"]["test"] == ["CMD", "distfork-entrypoint", "health"]
    assert "./keys:/keys:ro" in broker["volumes"]
    # workers get only their own pair and the broker's public key: never its secret, nor a client key
    assert sorted(v.split(":")[1] for v in worker["volumes"]) == ["/keys/broker.key", "/keys/worker.key",
                                                                   "/keys/worker.key_secret"]
    assert all(v.endswith(":ro") for v in worker["volumes"])
    # `--scale worker=N` needs a worker without a fixed name or published port
    assert "container_name" not in worker and "ports" not in worker
    assert _size_bytes(worker["shm_size"]) >= 1 << 30
    assert worker["depends_on"]["broker"]["condition"] == "service_healthy"


def test_the_broker_binds_everywhere_with_keys(compose: dict[str, Any]) -> None:
    broker = compose["services"]["broker"]
    role, *args = broker["command"]
    assert role == "broker" and "--insecure" not in args  # keyed by default (issue 11)
    _parses(["broker", "--bind", broker["environment"]["DISTFORK_BIND"], *args])
    assert broker["environment"]["DISTFORK_BIND"] == "tcp://0.0.0.0:7340"
    assert "--insecure" not in COMPOSE.read_text()
    # both ports are published on the host's loopback only: the broker port (drivers) and the metrics port
    published = {p.split(":")[-1]: p for p in broker["ports"]}
    assert set(published) == {"7340", broker["environment"]["DISTFORK_METRICS_PORT"]}
    assert all(p.startswith("127.0.0.1:") for p in published.values())


def test_workers_reach_the_broker_service(compose: dict[str, Any]) -> None:
    broker, worker = compose["services"]["broker"], compose["services"]["worker"]
    role, *args = worker["command"]
    assert role == "worker"
    _parses(["worker", "--connect", worker["environment"]["DISTFORK_ADDRESS"], *args])
    host_port = worker["environment"]["DISTFORK_ADDRESS"].removeprefix("tcp://")
    assert host_port == f"broker:{broker['environment']['DISTFORK_BIND'].rsplit(':', 1)[1]}"
