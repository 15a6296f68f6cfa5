"""deploy/kubernetes/ says what the code does: commands, settings, ports,
probes, Secrets, the image's user and the grace periods.

kubernetes-validate (.ci/check_containers.py) checks the manifests against
Kubernetes' schemas; these tests check them against taskservice: what a
schema cannot know. No cluster is involved (none is available here).
"""

from __future__ import annotations

import importlib.util
import os
import posixpath
import re
import shlex
import sys
from collections.abc import Iterator
from functools import cache
from types import ModuleType
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from taskservice.core.settings import CLIENT_VARIABLES, ENV_PREFIX, Settings, unknown_variables
from taskservice.server.server import LIVENESS, SERVICE_NAME
from tests.conftest import ROOT

MANIFESTS = ROOT / "deploy" / "kubernetes"
SECRET_FILE_SETTINGS = ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "tokens_file")

Resource = dict[str, Any]


@cache
def checker() -> ModuleType:
    """.ci/check_containers.py, for its Dockerfile parser and command checks."""
    spec = importlib.util.spec_from_file_location(
        "check_containers", ROOT / ".ci" / "check_containers.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@cache
def resources() -> tuple[Resource, ...]:
    found = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        found += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return tuple(found)


def of_kind(kind: str) -> dict[str, Resource]:
    return {r["metadata"]["name"]: r for r in resources() if r["kind"] == kind}


def deployment(component: str) -> Resource:
    (found,) = [
        d
        for d in of_kind("Deployment").values()
        if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component")
        == component
    ]
    return found


def containers() -> Iterator[tuple[str, Resource, Resource]]:
    """(where, pod spec, container) of every container of every Deployment."""
    for name, found in of_kind("Deployment").items():
        pod = found["spec"]["template"]["spec"]
        for container in pod["containers"]:
            yield f"{name}/{container['name']}", pod, container


def image_env() -> dict[str, str]:
    env: dict[str, str] = checker().parse_dockerfile(ROOT / "Dockerfile")[-1].env()
    return env


def container_env(container: Resource) -> dict[str, str]:
    """The container's environment as kubelet builds it: the image's ENV,
    then envFrom's ConfigMaps, then `env` (each overriding the one before)."""
    env = dict(image_env())
    configmaps = of_kind("ConfigMap")
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        assert name in configmaps, f"envFrom names a ConfigMap that is not here: {name}"
        env.update(configmaps[name]["data"])
    for item in container.get("env", []):
        assert "valueFrom" not in item, f"{item['name']}: checked only as a literal value"
        env[item["name"]] = item["value"]
    return env


def settings_of(container: Resource, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings the container's process reads (this process's own
    TASKSERVICE_* variables left out)."""
    for name in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)
    for name, value in container_env(container).items():
        if name.startswith(ENV_PREFIX):
            monkeypatch.setenv(name, value)
    return Settings()


def commands(pod: Resource, container: Resource) -> Iterator[tuple[str, list[str]]]:
    """(what, argv) of every command the container runs: its own, its probes' and hooks'."""
    argv = [*container.get("command", []), *container.get("args", [])]
    if not container.get("command"):  # the image's CMD, with `args` replacing it when given
        (cmd,) = checker().parse_dockerfile(ROOT / "Dockerfile")[-1].of("CMD")
        argv = container.get("args") or checker().exec_form(cmd.args)
    yield "command", argv
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        if "exec" in container.get(probe, {}):
            yield probe, container[probe]["exec"]["command"]
    for hook in ("postStart", "preStop"):
        if "exec" in container.get("lifecycle", {}).get(hook, {}):
            yield hook, container["lifecycle"][hook]["exec"]["command"]


def test_the_manifests_hold_each_part_of_a_deployment() -> None:
    kinds = sorted((r["kind"], r["metadata"]["name"]) for r in resources())
    assert kinds == [
        ("ConfigMap", "taskservice"),
        ("Deployment", "taskservice-server"),
        ("Deployment", "taskservice-worker"),
        ("HorizontalPodAutoscaler", "taskservice-server"),
        ("PodDisruptionBudget", "taskservice-server"),
        ("PodDisruptionBudget", "taskservice-worker"),
        ("Service", "taskservice-grpc"),
        ("Service", "taskservice-grpc-headless"),
    ]
    # One namespace, the one `kubectl apply -n` or the context names.
    assert not [r for r in resources() if "namespace" in r["metadata"]]


def test_every_command_is_a_real_taskservice_subcommand_with_real_options() -> None:
    check = checker()
    match = re.search(r"\{([\w,-]+)\}", check.taskservice_help())
    assert match, "`taskservice --help` lists no subcommands"
    subcommands = set(match[1].split(","))
    seen = []
    for where, pod, container in containers():
        for what, argv in commands(pod, container):
            seen.append((where, what, argv[:3]))
            if argv[0] == "sleep":  # the server's preStop: coreutils, in the image
                assert len(argv) == 2 and argv[1].isdigit(), f"{where} {what}: {argv}"
                continue
            assert argv[0] == "taskservice", f"{where} {what}: runs {argv[0]}"
            problem = check.taskservice_problem(argv, subcommands, container_env(container))
            assert problem is None, f"{where} {what} `{shlex.join(argv)}`: {problem}"
    assert (
        "taskservice-worker/worker",
        "livenessProbe",
        ["taskservice", "health", "--worker"],
    ) in (seen)
    assert ("taskservice-server/server", "command", ["taskservice", "serve"]) in seen


def test_every_taskservice_variable_is_a_setting_whose_value_validates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for where, _, container in containers():
        env = container_env(container)
        ours = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
        assert not unknown_variables(ours), (where, unknown_variables(ours))
        assert not CLIENT_VARIABLES & set(ours), f"{where}: a client's variable"
        try:
            settings_of(container, monkeypatch)
        except ValidationError as error:
            pytest.fail(f"{where}: {error}")
    for name, configmap in of_kind("ConfigMap").items():
        assert all(isinstance(v, str) for v in configmap["data"].values()), name
        assert all(k.startswith(ENV_PREFIX) for k in configmap["data"]), name


def test_probes_and_services_reach_the_ports_the_settings_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = deployment("server")["spec"]["template"]
    (container,) = server["spec"]["containers"]
    settings = settings_of(container, monkeypatch)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert settings.host == "0.0.0.0"
    assert ports == {
        "grpc": settings.port,
        "health": settings.health_port,
        "metrics": settings.metrics_port,
    }
    assert settings.metrics_host == "0.0.0.0"
    # kubelet presents no client certificate: under mutual TLS, every gRPC
    # probe must ask the plaintext health port, which serves health only.
    assert settings.tls_client_ca_file and settings.health_port
    probes = {name: container[name]["grpc"] for name in ("startupProbe", "livenessProbe")}
    probes["readinessProbe"] = container["readinessProbe"]["grpc"]
    for name, grpc_probe in probes.items():
        assert grpc_probe["port"] == settings.health_port, name
    # Liveness must not follow Redis (restarts cannot fix Redis); readiness must.
    assert probes["livenessProbe"].get("service") == LIVENESS
    assert probes["startupProbe"].get("service") == LIVENESS
    assert probes["readinessProbe"].get("service", "") in ("", SERVICE_NAME)

    labels = server["metadata"]["labels"]
    for name, service in of_kind("Service").items():
        assert service["spec"]["selector"] == labels, name
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            assert ports.get(target, target) == settings.port, f"{name}: {port}"
    assert of_kind("Service")["taskservice-grpc-headless"]["spec"]["clusterIP"] == "None"

    worker = deployment("worker")["spec"]["template"]["spec"]
    (container,) = worker["containers"]
    settings = settings_of(container, monkeypatch)
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "metrics": settings.worker_metrics_port
    }
    assert settings.heartbeat_file, "the worker's liveness probe reads it"
    for name in ("startupProbe", "livenessProbe"):
        assert container[name]["exec"]["command"] == ["taskservice", "health", "--worker"]
        # A check is a Python start: give it time on a busy node.
        assert container[name]["timeoutSeconds"] >= 5, name


def secret_files(pod: Resource, container: Resource) -> dict[str, tuple[str, str]]:
    """{file path in the container: (Secret name, key)} of its Secret mounts."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    files = {}
    for mount in container.get("volumeMounts", []):
        secret = volumes[mount["name"]].get("secret")
        if secret is None:
            continue
        assert mount.get("readOnly") is True, mount
        assert "subPath" not in mount, "a subPath mount never sees a rotated Secret"
        for item in secret["items"]:
            path = posixpath.join(mount["mountPath"], item["path"])
            files[path] = (secret["secretName"], item["key"])
    return files


def readme_secret_keys() -> set[tuple[str, str]]:
    """(Secret, key) of each `kubectl create secret generic` in README's Kubernetes section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n### Kubernetes\n", 1)[1].split("\n### ", 1)[0]
    created = set()
    for command in re.findall(r"kubectl create secret generic (?:\\\n|[^\n])*", section):
        words = shlex.split(command.replace("\\\n", " "))
        name = words[4]
        for word in words[5:]:
            key = word.removeprefix("--from-file=").split("=", 1)[0]
            created.add((name, key))
    return created


def test_each_secret_key_is_mounted_where_its_setting_points_and_created_as_readme_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pod = deployment("server")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    settings = settings_of(container, monkeypatch)
    files = secret_files(pod, container)
    pointed = {getattr(settings, name) for name in SECRET_FILE_SETTINGS}
    for name in SECRET_FILE_SETTINGS:
        path = getattr(settings, name)
        assert path in files, f"{name} = {path!r} is no mounted Secret key"
    assert set(files) == pointed, "a Secret key is mounted that no setting reads"
    for volume in pod["volumes"]:
        if "secret" in volume:
            # Readable by the group (fsGroup) only; the key file is private.
            assert volume["secret"]["defaultMode"] == 0o440, volume["name"]
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"]
    assert set(files.values()) == readme_secret_keys()
    # The worker reads no Secret.
    worker = deployment("worker")["spec"]["template"]["spec"]
    assert not secret_files(worker, worker["containers"][0])


def test_pods_run_as_the_image_user_with_a_read_only_root_and_a_writable_tmp(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    final = checker().parse_dockerfile(ROOT / "Dockerfile")[-1]
    user = final.of("USER")[-1].args
    (useradd,) = [r.args for r in final.of("RUN") if "useradd" in r.args]
    assert useradd.split()[-1] == user
    uid = int(re.search(r"--uid\s+(\d+)", useradd)[1])  # type: ignore[index]
    for where, pod, container in containers():
        security = pod["securityContext"]
        assert (security["runAsUser"], security["runAsNonRoot"]) == (uid, True), where
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert pod["enableServiceLinks"] is False, where
        assert pod["automountServiceAccountToken"] is False, where
        own = container["securityContext"]
        assert own["readOnlyRootFilesystem"] is True, where
        assert own["allowPrivilegeEscalation"] is False, where
        assert own["capabilities"] == {"drop": ["ALL"]}, where
        volumes = {v["name"]: v for v in pod["volumes"]}
        writable = [
            m["mountPath"]
            for m in container["volumeMounts"]
            if "emptyDir" in volumes[m["name"]] and not m.get("readOnly")
        ]
        # tempfile (the metrics folders) writes to /tmp.
        assert "/tmp" in writable, where
        heartbeat = settings_of(container, monkeypatch).heartbeat_file
        if heartbeat:
            assert any(heartbeat.startswith(path + "/") for path in writable), heartbeat
        for kind in ("requests", "limits"):
            assert set(container["resources"][kind]) == {"cpu", "memory"}, (where, kind)


def test_grace_periods_outlast_the_server_drain_and_give_workers_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pod = deployment("server")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    settings = settings_of(container, monkeypatch)
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    # preStop, then SIGTERM and the drain, then the process exits: a margin
    # for that last step, or kubelet's SIGKILL cuts the drain short.
    assert pod["terminationGracePeriodSeconds"] >= int(sleep[1]) + settings.shutdown_grace + 5
    worker = deployment("worker")["spec"]["template"]["spec"]
    assert worker["terminationGracePeriodSeconds"] >= 60


def service_link_variables(service: Resource) -> set[str]:
    """The variables kubelet gives a pod with service links for `service`
    (Kubernetes' docs, "Discovering services": its own and Docker's links)."""
    if service["spec"].get("clusterIP") == "None":
        return set()
    name = service["metadata"]["name"].upper().replace("-", "_")
    found = {f"{name}_SERVICE_HOST", f"{name}_SERVICE_PORT", f"{name}_PORT"}
    for port in service["spec"]["ports"]:
        found.add(f"{name}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}")
        prefix = f"{name}_PORT_{port['port']}_{port.get('protocol', 'TCP')}"
        found |= {prefix, f"{prefix}_PROTO", f"{prefix}_PORT", f"{prefix}_ADDR"}
    return found


def test_no_service_can_shadow_a_setting_in_pods_with_service_links() -> None:
    # A Service named `taskservice` would give every pod of the namespace
    # TASKSERVICE_PORT=tcp://<ip>:50051: a client's address, a server's port.
    read = {ENV_PREFIX + name.upper() for name in Settings.model_fields} | CLIENT_VARIABLES
    for name, service in of_kind("Service").items():
        assert not service_link_variables(service) & read, name
    assert "TASKSERVICE_PORT" in service_link_variables(
        {"metadata": {"name": "taskservice"}, "spec": {"ports": [{"name": "g", "port": 1}]}}
    )


def test_budgets_and_the_autoscaler_pick_the_right_pods() -> None:
    for component in ("server", "worker"):
        labels = deployment(component)["spec"]["template"]["metadata"]["labels"]
        assert deployment(component)["spec"]["selector"]["matchLabels"] == labels
        (budget,) = [
            b
            for b in of_kind("PodDisruptionBudget").values()
            if b["spec"]["selector"]["matchLabels"] == labels
        ]
        assert budget["spec"]["maxUnavailable"] == 1
    (autoscaler,) = of_kind("HorizontalPodAutoscaler").values()
    server = deployment("server")
    assert autoscaler["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": server["metadata"]["name"],
    }
    assert autoscaler["spec"]["minReplicas"] >= 3
    (metric,) = autoscaler["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    # The autoscaler owns the count: `kubectl apply` must not reset it.
    assert "replicas" not in server["spec"]
