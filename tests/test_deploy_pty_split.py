"""deploy/k8s/pty-workers: the base plus PTY-only workers on a queue of their own.

Rendered with the same small kustomize as ``test_deploy_files.py`` and checked
against Kubernetes' schemas, then for what deploy/README.md promises: the base
workers take workflows and LLM calls only, the PTY workers commands only, both
agree on the PTY queue, and the PTY pods keep the base's probes, grace period
and lock-down. Then the isolation: the PTY pods, where commands run, get no
provider keys, an explicit allow-list without interpreters, and a network
that reaches the Temporal frontend, DNS and public HTTPS but nothing else in
the cluster (checked by evaluating the NetworkPolicies for sample
connections, as a CNI would).
"""

from __future__ import annotations

import ipaddress
import tempfile
from dataclasses import dataclass, field
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]  # ships no py.typed
import pytest
from test_deploy_files import (
    INTERPRETERS,
    K8S,
    K8S_VERSIONS,
    PROVIDER_KEYS,
    PROVIDER_SECRET,
    allow_list,
    find,
    pod_spec,
    render,
)

from llmmixer.workers.worker import WorkerSettings

SPLIT = K8S / "pty-workers"


def as_worker_here(env: dict[str, str]) -> dict[str, str]:
    """``env`` read as a worker here would: the image's LLMMIXER_PTY_ROOT is a
    directory inside the container, so an existing one stands in for it (the
    worker refuses a root that does not exist)."""
    if "LLMMIXER_PTY_ROOT" not in env:
        return env
    return {**env, "LLMMIXER_PTY_ROOT": tempfile.gettempdir()}


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    return render(SPLIT)


def effective_env(objects: list[dict[str, Any]], deployment: str) -> dict[str, str]:
    [container] = pod_spec(find(objects, "Deployment", deployment))["containers"]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(find(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({item["name"]: item["value"] for item in container["env"] if "value" in item})
    return env


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_split_matches_kubernetes_schemas(objects: list[dict[str, Any]], version: str) -> None:
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


def test_each_deployment_takes_its_share(objects: list[dict[str, Any]]) -> None:
    base = WorkerSettings.from_env(as_worker_here(effective_env(objects, "llmmixer-worker")))
    pty = WorkerSettings.from_env(as_worker_here(effective_env(objects, "llmmixer-pty-worker")))
    assert base.roles == {"workflows", "llm"}
    assert pty.roles == {"pty"}
    assert base.pty_queue == pty.pty_queue != base.task_queue


def test_pty_pods_keep_the_base_guarantees(objects: list[dict[str, Any]]) -> None:
    base = find(objects, "Deployment", "llmmixer-worker")
    pty = find(objects, "Deployment", "llmmixer-pty-worker")
    # Selectors must not overlap, or the two Deployments fight over pods.
    base_labels = base["spec"]["selector"]["matchLabels"]
    pty_labels = pty["spec"]["template"]["metadata"]["labels"]
    assert not base_labels.items() <= pty_labels.items()
    env = effective_env(objects, "llmmixer-pty-worker")
    grace_s = float(env["LLMMIXER_SHUTDOWN_GRACE_S"])
    assert pod_spec(pty)["terminationGracePeriodSeconds"] >= grace_s + 15
    [container] = pod_spec(pty)["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    [base_container] = pod_spec(base)["containers"]
    assert container["image"] == base_container["image"]


def test_pty_pods_get_no_provider_keys(objects: list[dict[str, Any]]) -> None:
    pod = pod_spec(find(objects, "Deployment", "llmmixer-pty-worker"))
    [container] = pod["containers"]
    secrets = {s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s}
    secrets |= {
        item["valueFrom"]["secretKeyRef"]["name"]
        for item in container.get("env", [])
        if "secretKeyRef" in item.get("valueFrom", {})
    }
    secrets |= {v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
    # Temporal's credentials only: the worker must poll
    assert secrets <= {"llmmixer-temporal", "llmmixer-temporal-tls"}, secrets
    assert PROVIDER_SECRET not in secrets
    names = set(effective_env(objects, "llmmixer-pty-worker"))
    names |= {item["name"] for item in container.get("env", [])}
    assert not names & set(PROVIDER_KEYS)
    # while the LLM workers keep them
    [base] = pod_spec(find(objects, "Deployment", "llmmixer-worker"))["containers"]
    assert {"secretRef": {"name": PROVIDER_SECRET}} in base["envFrom"]


def test_only_pty_pods_run_commands_and_only_listed_ones(objects: list[dict[str, Any]]) -> None:
    pty_env = effective_env(objects, "llmmixer-pty-worker")
    base_env = effective_env(objects, "llmmixer-worker")
    allowed = allow_list(pty_env["LLMMIXER_PTY_ALLOW"])
    assert allowed, "unset, `llmmixer worker` refuses every command"
    assert not allowed & INTERPRETERS, f"an interpreter allows anything: {allowed & INTERPRETERS}"
    # set on the pod itself, not in the ConfigMap the LLM workers share
    [container] = pod_spec(find(objects, "Deployment", "llmmixer-pty-worker"))["containers"]
    assert "LLMMIXER_PTY_ALLOW" in {item["name"] for item in container["env"]}
    assert "LLMMIXER_PTY_ALLOW" not in base_env
    assert "pty" not in WorkerSettings.from_env(as_worker_here(base_env)).roles
    assert pty_env["LLMMIXER_PTY_ROOT"] == "/workspace"


def test_pty_pods_are_locked_down_like_the_base(objects: list[dict[str, Any]]) -> None:
    for name in ("llmmixer-worker", "llmmixer-pty-worker"):
        pod = pod_spec(find(objects, "Deployment", name))
        assert pod["automountServiceAccountToken"] is False, name
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        [container] = pod["containers"]
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, name
        assert security["allowPrivilegeEscalation"] is False, name
        assert security["capabilities"]["drop"] == ["ALL"], name
        assert "add" not in security["capabilities"], name
        assert not security.get("privileged"), name


# ---- network policy ------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """One end of a connection, as a NetworkPolicy sees it."""

    ip: str
    namespace: str = ""
    labels: dict[str, str] = field(default_factory=dict)


def _labels_match(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"unsupported selector {selector}"
    return selector.get("matchLabels", {}).items() <= labels.items()


def _peer_matches(rule_peer: dict[str, Any], peer: Peer, own_namespace: str) -> bool:
    if "ipBlock" in rule_peer:
        block = rule_peer["ipBlock"]
        address = ipaddress.ip_address(peer.ip)
        inside = address in ipaddress.ip_network(block["cidr"])
        excluded = any(address in ipaddress.ip_network(e) for e in block.get("except", []))
        return inside and not excluded
    if "namespaceSelector" in rule_peer:
        namespace_labels = {"kubernetes.io/metadata.name": peer.namespace}
        if not _labels_match(rule_peer["namespaceSelector"], namespace_labels):
            return False
    elif peer.namespace != own_namespace:
        return False
    return _labels_match(rule_peer.get("podSelector", {}), peer.labels)


def _port_matches(rule: dict[str, Any], port: int, protocol: str) -> bool:
    ports = rule.get("ports")
    if not ports:
        return True
    return any(
        p.get("protocol", "TCP") == protocol and p.get("port") in (None, port) for p in ports
    )


def egress_allowed(
    policies: list[dict[str, Any]], pod_labels: dict[str, str], to: Peer, port: int, proto: str
) -> bool:
    """Kubernetes' rule: isolated for egress once any policy selects the pod for
    egress; then allowed if any egress rule of any of those policies allows it."""
    selecting = [
        p
        for p in policies
        if _labels_match(p["spec"]["podSelector"], pod_labels)
        and "Egress" in p["spec"].get("policyTypes", [])
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("egress", []):
            peers = rule.get("to")
            peer_ok = not peers or any(_peer_matches(r, to, "llmmixer") for r in peers)
            if peer_ok and _port_matches(rule, port, proto):
                return True
    return False


FRONTEND = Peer(
    "10.8.0.20",
    "temporal",
    {"app.kubernetes.io/name": "temporal", "app.kubernetes.io/component": "frontend"},
)
DNS = Peer("10.8.0.10", "kube-system", {"k8s-app": "kube-dns"})


@pytest.mark.parametrize(
    ("to", "port", "proto", "allowed"),
    [
        # what the worker needs
        (FRONTEND, 7233, "TCP", True),
        (DNS, 53, "UDP", True),
        (DNS, 53, "TCP", True),
        # what commands may fetch: public HTTPS
        (Peer("140.82.112.3"), 443, "TCP", True),
        (Peer("2606:4700::1111"), 443, "TCP", True),
        # Temporal's other services, its database, other frontend ports
        (
            Peer(
                "10.8.0.21",
                "temporal",
                {"app.kubernetes.io/name": "temporal", "app.kubernetes.io/component": "history"},
            ),
            7234,
            "TCP",
            False,
        ),
        (
            Peer("10.8.0.22", "temporal", {"app.kubernetes.io/name": "postgresql"}),
            5432,
            "TCP",
            False,
        ),
        (FRONTEND, 7243, "TCP", False),
        # the LLM workers' pods and anything else in the cluster
        (
            Peer(
                "10.8.0.30",
                "llmmixer",
                {"app.kubernetes.io/name": "llmmixer", "app.kubernetes.io/component": "worker"},
            ),
            8081,
            "TCP",
            False,
        ),
        (Peer("10.96.0.1"), 443, "TCP", False),  # the Kubernetes API's Service
        (Peer("172.20.1.1"), 443, "TCP", False),
        (Peer("192.168.1.1"), 443, "TCP", False),
        (Peer("100.64.0.1"), 443, "TCP", False),
        (Peer("fd00:ec2::254"), 80, "TCP", False),
        # cloud metadata (instance credentials)
        (Peer("169.254.169.254"), 80, "TCP", False),
        (Peer("169.254.169.254"), 443, "TCP", False),
        # public, but not HTTPS: no public Temporal, no SSH, no plain HTTP
        (Peer("140.82.112.3"), 7233, "TCP", False),
        (Peer("140.82.112.3"), 22, "TCP", False),
        (Peer("140.82.112.3"), 80, "TCP", False),
        (Peer("1.1.1.1"), 53, "UDP", False),
    ],
    ids=lambda value: value.ip if isinstance(value, Peer) else None,
)
def test_pty_pods_reach_only_temporal_dns_and_public_https(
    objects: list[dict[str, Any]], to: Peer, port: int, proto: str, allowed: bool
) -> None:
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    labels = pod_spec_labels(objects, "llmmixer-pty-worker")
    assert egress_allowed(policies, labels, to, port, proto) is allowed


def test_pty_pods_accept_no_connections(objects: list[dict[str, Any]]) -> None:
    pty_labels = pod_spec_labels(objects, "llmmixer-pty-worker")
    selecting = [
        o
        for o in objects
        if o["kind"] == "NetworkPolicy" and _labels_match(o["spec"]["podSelector"], pty_labels)
    ]
    assert any("Ingress" in p["spec"]["policyTypes"] for p in selecting)
    assert all(not p["spec"].get("ingress") for p in selecting)
    # the policies are the PTY pods' own: the LLM workers' network is untouched
    base_labels = pod_spec_labels(objects, "llmmixer-worker")
    for policy in (o for o in objects if o["kind"] == "NetworkPolicy"):
        assert not _labels_match(policy["spec"]["podSelector"], base_labels)


def pod_spec_labels(objects: list[dict[str, Any]], deployment: str) -> dict[str, str]:
    labels: dict[str, str] = find(objects, "Deployment", deployment)["spec"]["template"][
        "metadata"
    ]["labels"]
    return labels
