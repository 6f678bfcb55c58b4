"""deploy/kubernetes/: every manifest valid by kubernetes-validate (its schemas ship in the package: offline),
and the objects wired to each other and to the image as deploy/README.md says."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from distfork.cli import cli

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))


def load_all() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def find(kind: str, name: str) -> dict[str, Any]:
    (obj,) = [d for d in load_all() if d["kind"] == kind and d["metadata"]["name"] == name]
    return obj


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c  # type: ignore[no-any-return]


def env_of(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", [])}


def _parses(args: list[str]) -> None:
    name, *rest = args
    cli.commands[name].make_context(name, rest)


def test_the_manifests_are_there() -> None:
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in load_all())
    assert kinds == [("Deployment", "distfork-broker"), ("Deployment", "distfork-worker"), ("Namespace", "distfork"),
                     ("NetworkPolicy", "distfork-broker"), ("Secret", "distfork-keys"), ("Service", "distfork-broker")]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_each_manifest_validates(path: Path) -> None:
    version = kubernetes_validate.latest_version()
    for doc in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("break_it", [
    lambda d: d["spec"].update(replicas="four"),
    lambda d: d["spec"]["template"]["spec"]["containers"][0].update(imagePullPolicy=["Always"]),
    lambda d: d["spec"]["template"]["spec"]["containers"][0].update(readinesProbe={}),  # misspelt: strict refuses
], ids=["replicas-word", "policy-list", "misspelt-field"])
def test_validation_rejects_a_broken_copy(break_it: Any) -> None:
    broken = copy.deepcopy(find("Deployment", "distfork-worker"))
    break_it(broken)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


def test_everything_lives_in_the_namespace() -> None:
    ns = find("Namespace", "distfork")["metadata"]["name"]
    for d in load_all():
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == ns, d["metadata"]


def test_the_service_selects_the_broker_and_its_ports() -> None:
    broker, svc = find("Deployment", "distfork-broker"), find("Service", "distfork-broker")
    assert broker["spec"]["replicas"] == 1 and broker["spec"]["strategy"]["type"] == "Recreate"
    labels = broker["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert broker["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"]: p["containerPort"] for p in container(broker)["ports"]}
    for p in svc["spec"]["ports"]:
        assert p["targetPort"] in ports and ports[p["targetPort"]] == p["port"]
    c = container(broker)
    role, *args = c["args"]
    assert role == "broker" and "--insecure" not in args  # keyed by default (issue 11)
    env = env_of(c)
    assert env["DISTFORK_BIND"].endswith(f":{ports['distfork']}")
    assert env["DISTFORK_METRICS_PORT"] == str(ports["metrics"])
    _parses(["broker", "--bind", env["DISTFORK_BIND"], "--metrics-port", env["DISTFORK_METRICS_PORT"], *args])
    assert env["DISTFORK_KEYS_DIR"] == "/keys"
    annotations = broker["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["metrics"])


def test_workers_connect_to_the_service_and_get_a_memory_dev_shm() -> None:
    worker, svc = find("Deployment", "distfork-worker"), find("Service", "distfork-broker")
    assert worker["spec"]["replicas"] >= 2
    c = container(worker)
    role, *args = c["args"]
    assert role == "worker"
    address = env_of(c)["DISTFORK_ADDRESS"]
    _parses(["worker", "--connect", address, *args])
    port = {p["name"]: p["port"] for p in svc["spec"]["ports"]}["distfork"]
    assert address == f"tcp://{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc:{port}"
    volumes = {v["name"]: v for v in worker["spec"]["template"]["spec"]["volumes"]}
    (shm,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"
    assert volumes[shm["name"]]["emptyDir"]["sizeLimit"]


def _probe_command(probe: dict[str, Any]) -> list[str]:
    cmd = probe["exec"]["command"]
    if cmd[:2] == ["sh", "-c"]:
        return shlex.split(cmd[2].split(";")[0])
    return cmd  # type: ignore[no-any-return]


def test_probes_run_distfork_status() -> None:
    broker, worker = find("Deployment", "distfork-broker"), find("Deployment", "distfork-worker")
    for probe in ("readinessProbe", "livenessProbe"):
        cmd = _probe_command(container(broker)[probe])
        assert cmd[0] == "distfork" and cmd[1] == "status"
        _parses(cmd[1:])
        assert _probe_command(container(worker)[probe]) == ["distfork-entrypoint", "health"]
    # a worker is restarted only if the broker answers without it (exit 3), not while the broker is away
    assert container(worker)["livenessProbe"]["exec"]["command"] == \
        ["sh", "-c", "distfork-entrypoint health; test $? -ne 3"]
    entrypoint = (ROOT / "worker" / "entrypoint.sh").read_text()
    assert "--expect-worker-host" in entrypoint and "distfork status" in entrypoint


def test_pods_run_as_the_images_non_root_user_with_the_keys_secret() -> None:
    uid = re.search(r"^USER (\d+)", (ROOT / "worker" / "Dockerfile").read_text(), re.M)
    assert uid and int(uid[1]) != 0
    secret = find("Secret", "distfork-keys")
    for name in ("distfork-broker", "distfork-worker"):
        pod = find("Deployment", name)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == int(uid[1])
        c = pod["containers"][0]
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        volumes = {v["name"]: v for v in pod["volumes"]}
        (keys,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/keys"]
        assert keys["readOnly"] is True
        ref = volumes[keys["name"]]["secret"]
        assert ref["secretName"] == secret["metadata"]["name"] and ref["optional"] is False  # keyed, always
        assert ref["defaultMode"] == 0o400 and pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
        assert env_of(c)["DISTFORK_KEYS_DIR"] == keys["mountPath"]
        assert pod["automountServiceAccountToken"] is False
        for item in ref["items"]:
            assert item["key"] in secret["stringData"]
    broker_keys = {i["path"] for v in find("Deployment", "distfork-broker")["spec"]["template"]["spec"]["volumes"]
                   if "secret" in v for i in v["secret"]["items"]}
    assert {"broker.key", "broker.key_secret", "allowed/clients/client.key",
            "allowed/workers/worker.key"} <= broker_keys  # `distfork keygen` layout
    worker_keys = {i["path"] for v in find("Deployment", "distfork-worker")["spec"]["template"]["spec"]["volumes"]
                   if "secret" in v for i in v["secret"]["items"]}
    assert worker_keys == {"worker.key", "worker.key_secret", "broker.key"}  # never the broker's secret


def test_the_network_policy_guards_the_broker_port() -> None:
    policy, broker = find("NetworkPolicy", "distfork-broker"), find("Deployment", "distfork-broker")
    labels = broker["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    rules = {p["port"]: rule for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert set(rules) == {7340, 9340} and all("from" in rule for rule in rules.values())  # nobody else at all
    worker_labels = find("Deployment", "distfork-worker")["spec"]["template"]["metadata"]["labels"]
    (peers,) = rules[7340]["from"]
    assert peers["podSelector"]["matchLabels"].items() <= worker_labels.items()
    assert peers["podSelector"]["matchExpressions"] == [
        {"key": "app.kubernetes.io/component", "operator": "In", "values": ["worker", "driver"]}]
    assert labels["app.kubernetes.io/component"] not in ["worker", "driver"]  # not the broker's own pods
    (scraper,) = rules[9340]["from"]
    assert scraper["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
