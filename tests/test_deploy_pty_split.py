"""deploy/k8s/pty-workers: the base plus PTY-only workers on a queue of their own.

Rendered with the same small kustomize as ``test_deploy_files.py`` and checked
against Kubernetes' schemas, then for what deploy/README.md promises: the base
workers take workflows and LLM calls only, the PTY workers commands only, both
agree on the PTY queue, and the PTY pods keep the base's probes, grace period
and lock-down.
"""

from __future__ import annotations

from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]  # ships no py.typed
import pytest
from test_deploy_files import K8S, K8S_VERSIONS, find, pod_spec, render

from llmmixer.workers.worker import WorkerSettings

SPLIT = K8S / "pty-workers"


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
    base = WorkerSettings.from_env(effective_env(objects, "llmmixer-worker"))
    pty = WorkerSettings.from_env(effective_env(objects, "llmmixer-pty-worker"))
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
