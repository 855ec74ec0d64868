"""The deployment files: valid against their schemas, in step with the CLI, the settings and the queues.

Schemas (vendored in tests/schemas/, see its README.md): the Compose Specification's JSON schema,
the Kubernetes schemas shipped with the ``kubernetes-validate`` package (strict: unknown fields are
errors) for the versions in ``K8S_VERSIONS``, and KEDA's ScaledObject CRD (its openAPIV3Schema,
made strict the way the API server prunes unknown fields).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import tomllib
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from lipfarm.common.config import SETTINGS

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
KNOWN = {s.env for s in SETTINGS}

K8S_VERSIONS = ("1.30", "1.34")   # oldest and a recent minor the manifests must both satisfy
HANDBACK_S = 10                   # tests/test_recovery.py STOP_BOUND_S: SIGTERM to exit, hand-back done (2-3 s measured)
GRACE_MARGIN = 2                  # workers get at least this many times the hand-back bound

# Every lipfarm_* series the Grafana dashboard queries, with the labels it relies on. The code's
# exported metrics must provide these (checked against common.metrics' own metric objects below).
DASHBOARD_METRICS = {
    "lipfarm_frames_rendered_total": set(),
    "lipfarm_chunk_seconds_bucket": {"le"},
    "lipfarm_inference_fps": set(),
    "lipfarm_chunk_attempts_total": set(),
    "lipfarm_chunk_failures_total": {"reason"},
    "lipfarm_chunk_retries_total": {"reason"},
    "lipfarm_jobs": {"state"},
    "lipfarm_queue_length": {"queue", "priority", "lane"},
    "lipfarm_finalize_seconds_bucket": {"le"},
    "lipfarm_time_to_first_chunk_seconds_bucket": {"le"},
    "lipfarm_publish_tail_seconds_bucket": {"le"},
}
# Flower 2.x's own metrics (flower/events.py) the dashboard uses.
FLOWER_METRICS = {
    "flower_events_total": {"worker", "type", "task"},
    "flower_task_runtime_seconds_bucket": {"worker", "task", "le"},
}
TARGET_LABELS = {"instance", "job", "pod", "namespace"}   # added by Prometheus' scrape config

# Metadata keys KEDA's redis scaler reads (pkg/scalers/redis_scaler.go, v2.20.2).
REDIS_TRIGGER_KEYS = {"address", "addresses", "host", "hosts", "port", "ports", "username", "password",
                      "usernameFromEnv", "passwordFromEnv", "sentinelUsername", "sentinelPassword",
                      "sentinelMaster", "unsafeSsl", "listLength", "activationListLength", "listName",
                      "databaseIndex", "enableTLS"}


# ---------------------------------------------------------------------------------------------
# Loading

def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def _k8s_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _k8s_docs() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in _k8s_files() for doc in yaml.safe_load_all(path.read_text()) if doc]


def _of_kind(kind: str) -> list[tuple[str, dict]]:
    return [(name, doc) for name, doc in _k8s_docs() if doc["kind"] == kind]


def _workloads() -> list[tuple[str, dict]]:
    return [(name, doc) for name, doc in _k8s_docs() if doc["kind"] in ("Deployment", "StatefulSet")]


def _lipfarm_containers():
    """(where, container) for every Kubernetes container running a lipfarm image."""
    for name, doc in _workloads():
        for container in doc["spec"]["template"]["spec"]["containers"]:
            if container["image"].startswith("lipfarm"):
                yield f"{name}:{doc['metadata']['name']}/{container['name']}", doc, container


def _compose_env(service: dict) -> dict:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


def _commands():
    """(where, lipfarm arguments) of every container the deploy files run from a lipfarm image."""
    for name, service in _compose()["services"].items():
        if service.get("image", "").startswith("lipfarm"):
            yield f"compose:{name}", service.get("command")
    for where, _doc, container in _lipfarm_containers():
        yield where, container.get("args")


def _parse(args):
    from lipfarm.cli import build_parser

    parser = build_parser()
    try:
        return parser.parse_args([str(a) for a in args])
    except SystemExit:
        pytest.fail(f"`lipfarm {' '.join(map(str, args))}` does not parse with lipfarm.cli "
                    "(argparse's message is in the captured stderr)")


def _flag(args, flag: str, default: str | None = None) -> str | None:
    """The value of ``flag`` in a container's arguments, read without the CLI's parser."""
    args = [str(a) for a in args or []]
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return default


def _strings(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)
    elif isinstance(node, str):
        yield node


def _duration_s(value) -> float:
    """A Compose duration ("2m", "1m30s", "90s") or a number of seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, value
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * scale[u] for n, u in parts)


def _quantity_bytes(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i?)?", value).groups()
    scale = {None: 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    return float(number) * scale[unit]


def _render_lists() -> set[str]:
    """The Redis lists Celery's Redis transport uses for the render queue, one per priority step.

    Computed with kombu's own naming (``Channel._q_for_pri``) from the app's transport options.
    """
    from kombu.transport.redis import Channel

    from lipfarm.common.celery_app import PRIORITIES, app

    options = app.conf.broker_transport_options
    channel = SimpleNamespace(priority_steps=options["priority_steps"], sep=options["sep"])
    channel.priority = lambda n: Channel.priority(channel, n)
    lists = {Channel._q_for_pri(channel, "render", step) for step in options["priority_steps"]}
    assert {Channel._q_for_pri(channel, "render", p) for p in PRIORITIES.values()} <= lists
    return lists


def _strict(schema):
    """An OpenAPI v3 CRD schema with unknown fields made errors (the API server would prune them)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _keda_validator() -> jsonschema.Draft7Validator:
    crd = yaml.safe_load((SCHEMAS / "keda.sh_scaledobjects.yaml").read_text())
    assert crd["spec"]["names"]["kind"] == "ScaledObject"
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1" and v["served"])
    schema = _strict(version["schema"]["openAPIV3Schema"])
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return jsonschema.Draft7Validator(schema)


def _keda_errors(doc: dict) -> list[str]:
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in _keda_validator().iter_errors(doc)]
    spec = doc.get("spec", {})
    # the CRD's CEL rule, which JSON Schema cannot say
    if "minReplicaCount" in spec and spec["minReplicaCount"] > spec.get("maxReplicaCount", 100):
        errors.append("minReplicaCount must be less than or equal to maxReplicaCount")
    return errors


def _compose_errors(compose: dict) -> list[str]:
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose)]


def _k8s_errors(doc: dict, version: str) -> list[str]:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{list(exc.absolute_path)}: {exc.message}"]
    return []


# ---------------------------------------------------------------------------------------------
# The CLI and the settings

@pytest.mark.parametrize("where,args", list(_commands()), ids=[w for w, _ in _commands()])
def test_every_container_command_parses(where, args):
    from lipfarm.common.celery_app import QUEUES

    assert args, f"{where}: a lipfarm container must say which command it runs"
    parsed = _parse(args)
    if parsed.command == "worker":
        queues = set(parsed.queues.split(","))
        assert queues <= set(QUEUES), (where, queues - set(QUEUES))


def test_the_farm_runs_every_role_in_compose_and_in_kubernetes():
    for origin in ("compose:", ".yaml:"):
        commands = [list(map(str, args)) for where, args in _commands() if origin in where and args]
        roles = set()
        for args in commands:
            head = args[0]
            if head == "worker":
                queues = _flag(args, "--queues", "").split(",")
                roles.add("render-worker" if queues == ["render"] else
                          "jobs-worker" if sorted(queues) == ["finalize", "jobs"] else "other-worker")
            elif head == "reconcile":
                roles.add("reconcile" if "--loop" in args else "reconcile-once")
            else:
                roles.add(head)
        assert {"api", "render-worker", "jobs-worker", "reconcile", "flower"} <= roles, (origin, roles)


def test_every_lipfarm_variable_is_a_known_setting():
    seen = {}
    for name, service in _compose()["services"].items():
        seen[f"compose:{name}"] = set(_compose_env(service))
    for where, _doc, container in _lipfarm_containers():
        seen[where] = {e["name"] for e in container.get("env", [])}
    for name, doc in _of_kind("ConfigMap"):
        seen[f"{name}:{doc['metadata']['name']}"] = set(doc["data"])
    for path in DEPLOY.glob("Dockerfile*"):
        seen[path.name] = set(re.findall(r"\b(LIPFARM_[A-Z0-9_]+)=", path.read_text()))
    for where, names in seen.items():
        unknown = {n for n in names if n.startswith("LIPFARM_") and n not in KNOWN}
        assert not unknown, (where, unknown)
    assert sum(1 for names in seen.values() if any(n.startswith("LIPFARM_") for n in names)) >= 10


def test_dockerfiles_set_known_settings_copy_every_package_and_expose_the_ports():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # the folders pip installs as lipfarm.<room> (package-dir), each copied into the image
    packages = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    assert {"lipfarm", "common", "job", "worker", "scheduler", "api", "cli"} <= packages
    ports = {port["containerPort"] for _w, _d, c in _lipfarm_containers() for port in c.get("ports", [])}
    for path in DEPLOY.glob("Dockerfile*"):
        text = path.read_text()
        names = set(re.findall(r"\b(LIPFARM_[A-Z0-9_]+)=", text))
        assert names and names <= KNOWN, (path.name, names - KNOWN)
        copied = set(re.findall(r"^COPY\s+(\S+)\s+\1\s*$", text, re.M))
        assert packages <= copied, (path.name, "COPY the packages pip installs", packages - copied)
        exposed = {int(p) for line in re.findall(r"^EXPOSE\s+(.+)$", text, re.M) for p in line.split()}
        assert ports <= exposed, (path.name, ports - exposed)


# ---------------------------------------------------------------------------------------------
# Compose

def test_compose_file_matches_the_compose_specification():
    errors = _compose_errors(_compose())
    assert not errors, "\n".join(errors)


def test_compose_references_resolve_and_healthchecks_back_the_conditions():
    compose = _compose()
    services = compose["services"]
    volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        for other in depends:
            assert other in services, (name, other)
            condition = depends[other].get("condition") if isinstance(depends, dict) else None
            if condition == "service_healthy":
                assert "healthcheck" in services[other], (name, "waits for", other, "which has no healthcheck")
        for mount in service.get("volumes", []):
            source = mount.split(":")[0] if isinstance(mount, str) else mount.get("source", "")
            if source and not source.startswith((".", "/", "~")):
                assert source in volumes, (name, source)
        if service.get("ports") or (service.get("command") or [""])[0] == "worker":
            assert "healthcheck" in service, (name, "serves a port but has no healthcheck")


def test_compose_commits_no_secrets():
    for text in _strings(_compose()):   # interpolations are well formed: $$, ${VAR}, ${VAR:-x}, ${VAR:?x}
        for match in re.finditer(r"\$(\$|\{[^}]*\}|\w*)", text):
            assert match.group(1) == "$" or re.fullmatch(r"\{[A-Z_][A-Z0-9_]*(?:(:?[-?])[^}]*)?\}",
                                                         match.group(1)), (text, match.group(0))
    secret = re.compile(r"SECRET|PASSWORD|TOKEN|AUTH")
    found = 0
    for name, service in _compose()["services"].items():
        for key, value in _compose_env(service).items():
            if secret.search(key):
                found += 1
                assert re.fullmatch(r"\$\{[A-Z_][A-Z0-9_]*:\?[^}]+\}", str(value)), (
                    name, key, "a secret must come from the environment: ${VAR:?message}")
    assert found >= 2
    assert not (DEPLOY / "seaweedfs-s3.json").exists()


def test_compose_workers_outlast_a_chunk_hand_back():
    workers = {name: s for name, s in _compose()["services"].items() if (s.get("command") or [""])[0] == "worker"}
    assert workers
    for name, service in workers.items():
        assert service.get("stop_signal", "SIGTERM") == "SIGTERM", name   # Celery's warm shutdown
        grace = _duration_s(service.get("stop_grace_period", "10s"))      # Compose's default is 10 s
        assert grace >= GRACE_MARGIN * HANDBACK_S, (name, grace)


# ---------------------------------------------------------------------------------------------
# Kubernetes

@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_match_the_kubernetes_schemas(version):
    validated = 0
    for name, doc in _k8s_docs():
        if doc["apiVersion"].startswith("keda.sh/"):
            continue
        errors = _k8s_errors(doc, version)
        assert not errors, (name, doc["kind"], doc["metadata"]["name"], errors)
        validated += 1
    assert validated >= 10


def test_scaled_objects_match_the_keda_crd():
    objects = _of_kind("ScaledObject")
    assert objects
    for name, doc in objects:
        errors = _keda_errors(doc)
        assert not errors, (name, doc["metadata"]["name"], errors)


def test_kustomization_lists_every_manifest_and_one_namespace():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in _k8s_files())
    namespaces = {doc["metadata"].get("namespace") for _n, doc in _k8s_docs() if doc["kind"] != "Namespace"}
    assert namespaces == {kustomization["namespace"]}
    assert not _of_kind("Secret"), "secrets are created by the operator, not committed"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_renders_every_manifest():
    rendered = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert rendered.returncode == 0, rendered.stderr
    objects = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(rendered.stdout) if d}
    assert objects == {(d["kind"], d["metadata"]["name"]) for _n, d in _k8s_docs()}


def test_containers_have_resources_and_cache_fits_its_volume():
    config = {k: v for _n, doc in _of_kind("ConfigMap") for k, v in doc["data"].items()}
    for name, doc in _workloads():
        spec = doc["spec"]["template"]["spec"]
        for container in spec["containers"]:
            resources = container.get("resources", {})
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), (name, container["name"])
            assert "memory" in resources.get("limits", {}), (name, container["name"])
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            cache_gb = float(env.get("LIPFARM_CACHE_MAX_GB") or config.get("LIPFARM_CACHE_MAX_GB", "20"))
            for mount in container.get("volumeMounts", []):
                if mount["mountPath"] == "/var/lib/lipfarm/cache":
                    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
                    limit = volume.get("emptyDir", {}).get("sizeLimit")
                    assert limit and _quantity_bytes(limit) > cache_gb * 2**30, (name, limit, cache_gb)


def test_kubernetes_workers_outlast_a_chunk_hand_back():
    workers = [(where, doc) for where, doc, c in _lipfarm_containers() if (c.get("args") or [""])[0] == "worker"]
    assert len(workers) >= 3
    for where, doc in workers:
        grace = doc["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)   # k8s default 30
        assert grace >= GRACE_MARGIN * HANDBACK_S, (where, grace)


def test_gpu_workers_request_a_gpu_on_gpu_nodes():
    tag = re.search(r"docker build -f deploy/Dockerfile.gpu -t (\S+)", (DEPLOY / "Dockerfile.gpu").read_text())[1]
    cpu_tag = re.search(r"docker build -f deploy/Dockerfile -t (\S+)", (DEPLOY / "Dockerfile").read_text())[1]
    gpu = [(w, d, c) for w, d, c in _lipfarm_containers() if c["image"] == tag]
    assert gpu, f"no Deployment runs {tag}"
    for where, doc, container in gpu:
        assert int(container["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1, where
        spec = doc["spec"]["template"]["spec"]
        assert spec.get("nodeSelector") or spec.get("affinity"), where
        assert any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", [])), where
        assert int(_flag(container["args"], "--concurrency", "0")) > 1, (where, "several processes share the GPU")
    for where, _doc, container in _lipfarm_containers():
        assert container["image"] in (tag, cpu_tag), (where, container["image"])
        if container["image"] == cpu_tag:
            assert "nvidia.com/gpu" not in container.get("resources", {}).get("limits", {}), where


def test_render_workers_scale_to_zero_on_every_priority_list_of_the_render_queue():
    lists = _render_lists()
    assert "render" in lists and len(lists) >= 3
    deployments = {doc["metadata"]["name"]: doc for _n, doc in _of_kind("Deployment")}
    render = {doc["metadata"]["name"] for _w, doc, c in _lipfarm_containers()
              if (c.get("args") or [""])[0] == "worker" and "render" in _flag(c["args"], "--queues", "").split(",")}
    assert render
    broker = urlsplit(_k8s_broker_url())
    scaled = {}
    for _name, doc in _of_kind("ScaledObject"):
        spec = doc["spec"]
        target = spec["scaleTargetRef"]["name"]
        assert target in deployments, target
        assert "replicas" not in deployments[target]["spec"], (target, "KEDA owns the replica count")
        scaled[target] = spec
        assert spec.get("minReplicaCount") == 0, target
        triggers = spec["triggers"]
        assert all(t["type"] == "redis" for t in triggers), target
        watched = Counter(t["metadata"]["listName"] for t in triggers)
        assert set(watched) == lists and set(watched.values()) == {1}, (target, watched, lists)
        for trigger in triggers:
            meta = trigger["metadata"]
            assert set(meta) <= REDIS_TRIGGER_KEYS, (target, set(meta) - REDIS_TRIGGER_KEYS)
            assert meta["address"] == f"{broker.hostname}:{broker.port or 6379}", (target, meta["address"])
            assert meta.get("databaseIndex", "0") == (broker.path.strip("/") or "0"), target
            assert meta.get("username") == broker.username, (target, "KEDA logs in as the farm's Redis user")
        modifiers = spec.get("advanced", {}).get("scalingModifiers")
        if modifiers:   # the formula must use every trigger, each by its name
            names = {t.get("name") for t in triggers}
            assert None not in names and set(re.findall(r"[A-Za-z_]\w*", modifiers["formula"])) == names, target
    assert render <= set(scaled), ("render workers without a ScaledObject", render - set(scaled))


# ---------------------------------------------------------------------------------------------
# Secrets and network: Redis needs a password from a Secret, only the farm reaches it

REDIS_SECRET = {"name": "lipfarm-redis", "key": "password"}
REDIS_ACL = ["--user", "default", "off", "--user", "lipfarm", "on"]   # the passwordless user off, ours on
# Parameters KEDA's redis scaler takes from a TriggerAuthentication (pkg/scalers/redis_scaler.go, v2.20.2).
REDIS_AUTH_PARAMS = {"username", "password", "sentinelUsername", "sentinelPassword", "enableTLS", "unsafeSsl",
                     "ca", "cert", "key", "keyPassword"}
# TriggerAuthentication's spec.secretTargetRef, as KEDA's CRD (keda.sh_triggerauthentications.yaml, v2.20.2)
# defines it: a list of {parameter, name, key}, all three required strings.
TRIGGER_AUTH_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"}, "kind": {"const": "TriggerAuthentication"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {"type": "object", "additionalProperties": False, "required": ["secretTargetRef"], "properties": {
            "secretTargetRef": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["parameter", "name", "key"], "additionalProperties": False,
                "properties": {"parameter": {"type": "string"}, "name": {"type": "string"},
                               "key": {"type": "string"}}}}}}}}


def _env_list(container: dict) -> list[dict]:
    return container.get("env") or []


def _k8s_broker_url() -> str:
    """The one LIPFARM_BROKER_URL every lipfarm container is given (in its own ``env``)."""
    urls = {next((e["value"] for e in _env_list(c) if e["name"] == "LIPFARM_BROKER_URL"), None)
            for _w, _d, c in _lipfarm_containers()}
    assert len(urls) == 1 and None not in urls, urls
    return urls.pop()


def _redis_workload() -> dict:
    return next(doc for _n, doc in _of_kind("StatefulSet") if doc["metadata"]["name"] == "redis")


def test_kubernetes_redis_and_every_client_use_the_password_of_one_secret():
    redis = _redis_workload()["spec"]["template"]["spec"]["containers"][0]
    args = redis["args"]
    assert " ".join(REDIS_ACL) in " ".join(args) and ">$(REDIS_PASSWORD)" in args, args
    env = {e["name"]: e for e in _env_list(redis)}
    for name in ("REDIS_PASSWORD", "REDISCLI_AUTH"):
        assert env[name]["valueFrom"]["secretKeyRef"] == REDIS_SECRET, name
    assert "--user lipfarm" in " ".join(redis["readinessProbe"]["exec"]["command"])   # the probe logs in too
    assert not any("LIPFARM_BROKER_URL" in doc.get("data", {}) for _n, doc in _of_kind("ConfigMap"))
    url = urlsplit(_k8s_broker_url())
    assert (url.username, url.password) == ("lipfarm", "$(REDIS_PASSWORD)"), url
    service = next(doc for _n, doc in _of_kind("Service") if doc["metadata"]["name"] == "redis")
    assert url.hostname == f"redis.{service['metadata']['namespace']}.svc.cluster.local"
    for where, _doc, container in _lipfarm_containers():
        names = [e["name"] for e in _env_list(container)]
        # Kubernetes expands $(VAR) only from variables defined before it in the same list
        assert names.index("REDIS_PASSWORD") < names.index("LIPFARM_BROKER_URL"), where
        password = next(e for e in _env_list(container) if e["name"] == "REDIS_PASSWORD")
        assert password["valueFrom"]["secretKeyRef"] == REDIS_SECRET, where


def test_keda_logs_in_to_redis_with_the_farms_secret():
    auths = {doc["metadata"]["name"]: doc for _n, doc in _of_kind("TriggerAuthentication")}
    assert auths
    validator = jsonschema.Draft7Validator(TRIGGER_AUTH_SCHEMA)
    for name, doc in auths.items():
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors, (name, errors)
        refs = {r["parameter"]: {"name": r["name"], "key": r["key"]} for r in doc["spec"]["secretTargetRef"]}
        assert set(refs) <= REDIS_AUTH_PARAMS, (name, set(refs) - REDIS_AUTH_PARAMS)
        assert refs["password"] == REDIS_SECRET, name
    for _n, scaled in _of_kind("ScaledObject"):
        for trigger in scaled["spec"]["triggers"]:
            assert trigger.get("authenticationRef", {}).get("name") in auths, (scaled["metadata"]["name"], trigger)
    broken = copy.deepcopy(next(iter(auths.values())))
    broken["spec"]["secretTargetRef"][0].pop("key")
    assert list(validator.iter_errors(broken))


def test_only_the_farms_pods_reach_redis():
    redis_labels = _redis_workload()["spec"]["template"]["metadata"]["labels"]
    policies = [doc for _n, doc in _of_kind("NetworkPolicy")
                if doc["spec"]["podSelector"].get("matchLabels", {}).items() <= redis_labels.items()
                and doc["spec"]["podSelector"].get("matchLabels")]
    assert len(policies) == 1, policies
    spec = policies[0]["spec"]
    assert spec["policyTypes"] == ["Ingress"] and len(spec["ingress"]) == 1
    rule = spec["ingress"][0]
    assert rule["ports"] == [{"port": "redis", "protocol": "TCP"}]
    farm = {doc["spec"]["template"]["metadata"]["labels"]["app"] for _w, doc, _c in _lipfarm_containers()}
    allowed, others = set(), []
    for peer in rule["from"]:
        if "namespaceSelector" in peer:
            others.append(peer)
            continue
        (expression,) = peer["podSelector"]["matchExpressions"]
        assert (expression["key"], expression["operator"]) == ("app", "In")
        allowed |= set(expression["values"])
    assert allowed == farm, (allowed ^ farm)
    # the one other peer: KEDA's operator, which reads the render lists to scale the workers
    assert others == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}},
                       "podSelector": {"matchLabels": {"app": "keda-operator"}}}]


def test_signing_secrets_come_from_secrets():
    documented = (K8S / "config.yaml").read_text()
    for where, _doc, container in _lipfarm_containers():
        args = container.get("args") or [""]
        signs = args[0] == "api" or (args[0] == "worker" and "jobs" in _flag(args, "--queues", "").split(","))
        sources = [s.get("secretRef", {}).get("name") for s in container.get("envFrom", [])]
        assert ("lipfarm-signing" in sources) == signs, where
    assert re.search(r"lipfarm-signing:\s+LIPFARM_API_SECRET .*LIPFARM_WEBHOOK_SECRET", documented, re.S)
    services = _compose()["services"]
    for service, name in (("api", "LIPFARM_API_SECRET"), ("jobs-worker", "LIPFARM_WEBHOOK_SECRET")):
        assert re.fullmatch(rf"\$\{{{name}:\?[^}}]+\}}", _compose_env(services[service])[name]), service


def test_compose_redis_needs_the_password_and_stays_off_the_host():
    services = _compose()["services"]
    redis = services["redis"]
    assert "ports" not in redis, "Redis must not be published on the host"
    command = [str(a) for a in redis["command"]]
    assert " ".join(REDIS_ACL) in " ".join(command)
    assert any(re.fullmatch(r">\$\{LIPFARM_REDIS_PASSWORD:\?[^}]+\}", a) for a in command), command
    assert "--user lipfarm" in " ".join(redis["healthcheck"]["test"])
    for name, service in services.items():
        url = _compose_env(service).get("LIPFARM_BROKER_URL")
        if (service.get("image") or "").startswith("lipfarm"):
            assert url and re.fullmatch(r"redis://lipfarm:\$\{LIPFARM_REDIS_PASSWORD:\?[^}]+\}@redis:6379/\d+", url), (
                name, url)


def test_the_queue_panel_sums_every_priority_and_lane():
    """Each API replica exports the same farm-wide gauge: collapse replicas over every label the code
    exports (max), then sum priorities and lanes: 3 waiting in two lanes show as 3, not 2."""
    from lipfarm.common.metrics import exported_series

    (expr,) = [t["expr"] for p in _panels(_dashboard()) for t in p.get("targets", [])
               if "lipfarm_queue_length" in t["expr"]]
    inner = re.fullmatch(r"sum by \(queue\) \(max by \(([^)]*)\) \(lipfarm_queue_length\)\)", expr)
    assert inner, expr
    assert {s.strip() for s in inner[1].split(",")} == exported_series()["lipfarm_queue_length"]


# ---------------------------------------------------------------------------------------------
# The validators catch what they should (so the tests above can fail)

def test_the_validators_reject_broken_files():
    compose = _compose()
    broken = copy.deepcopy(compose)
    broken["services"]["redis"]["helthcheck"] = broken["services"]["redis"].pop("healthcheck")
    assert _compose_errors(broken) and not _compose_errors(compose)

    name, doc = next((n, d) for n, d in _of_kind("Deployment") if d["metadata"]["name"] == "lipfarm-render")
    broken = copy.deepcopy(doc)
    spec = broken["spec"]["template"]["spec"]
    spec["terminationGracePeriodSecond"] = spec.pop("terminationGracePeriodSeconds")
    assert _k8s_errors(broken, K8S_VERSIONS[0]) and not _k8s_errors(doc, K8S_VERSIONS[0])
    broken = copy.deepcopy(doc)
    broken["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = [4]
    assert _k8s_errors(broken, K8S_VERSIONS[-1])

    _name, scaled = _of_kind("ScaledObject")[0]
    for change in ({"minReplicas": 0}, {"minReplicaCount": -1}, {"triggers": []},
                   {"minReplicaCount": 60, "maxReplicaCount": 50}):
        broken = copy.deepcopy(scaled)
        broken["spec"].update(change)
        assert _keda_errors(broken), change
    assert not _keda_errors(scaled)


# ---------------------------------------------------------------------------------------------
# Grafana

def _dashboard() -> dict:
    return json.loads((DEPLOY / "grafana-dashboard.json").read_text())


def _panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def test_grafana_dashboard_is_a_well_formed_model():
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    boxes = []
    for panel in panels:
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= set(grid) and grid["x"] + grid["w"] <= 24, panel["title"]
        for other in boxes:
            assert (grid["x"] >= other["x"] + other["w"] or other["x"] >= grid["x"] + grid["w"]
                    or grid["y"] >= other["y"] + other["h"] or other["y"] >= grid["y"] + grid["h"]), panel["title"]
        boxes.append(grid)
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"]) == panel["datasource"], panel["title"]
            expr = target["expr"].strip()
            assert expr, panel["title"]
            for opening, closing in ("()", "[]", "{}"):
                depth = 0
                for ch in expr:
                    depth += (ch == opening) - (ch == closing)
                    assert depth >= 0, (panel["title"], expr)
                assert depth == 0, (panel["title"], expr)


def test_grafana_dashboard_queries_only_listed_metrics_correctly():
    known = {**DASHBOARD_METRICS, **FLOWER_METRICS}
    used = set()
    exprs = [t["expr"] for p in _panels(_dashboard()) for t in p.get("targets", [])]
    for expr in exprs:
        names = set(re.findall(r"\b((?:lipfarm|flower)_[a-z0-9_]+)\b", expr))
        assert names, expr
        assert names <= set(known), (expr, names - set(known))
        used |= names
        # rate()/increase() only over counters and histogram series, never over gauges
        for name in re.findall(r"\b(?:rate|irate|increase)\(\s*([a-z_][a-z0-9_]*)", expr):
            assert name.endswith(("_total", "_bucket", "_count", "_sum")), (expr, name)
        for name in names:
            if name.endswith(("_total", "_bucket")):
                assert re.search(rf"\b(?:rate|irate|increase)\(\s*{name}\b", expr), (expr, "raw counter", name)
        # histogram_quantile over buckets aggregated by le
        for by, name in re.findall(r"histogram_quantile\(\s*[0-9.]+\s*,\s*sum by \(([^)]*)\)\s*\("
                                   r"\s*rate\(\s*([a-z_][a-z0-9_]*)\[", expr):
            assert name.endswith("_bucket") and "le" in {s.strip() for s in by.split(",")}, expr
        assert expr.count("histogram_quantile(") == len(re.findall(r"histogram_quantile\(\s*[0-9.]+\s*,\s*sum by", expr))
        # grouping labels exist on the metrics grouped
        labels = set().union(*(known[n] for n in names)) | TARGET_LABELS
        for group in re.findall(r"\bby \(([^)]*)\)", expr):
            grouped = {s.strip() for s in group.split(",") if s.strip()}
            assert grouped <= labels, (expr, grouped - labels)
    assert used == set(known), ("listed but not on the dashboard", set(known) - used)


def test_the_dashboard_queries_only_series_the_code_exports():
    """Every lipfarm_* series the dashboard names (``DASHBOARD_METRICS``, which the test above keeps
    equal to the dashboard's) is exported by the workers or the API, with the labels it groups by."""
    from lipfarm.common.metrics import exported_series

    exported = exported_series()
    missing = {name: sorted(labels) for name, labels in DASHBOARD_METRICS.items()
               if name not in exported or not labels <= exported[name]}
    assert not missing, ("the dashboard queries series the code does not export", missing)
    assert all(name.startswith("lipfarm_") for name in exported)


def test_the_flower_metrics_the_dashboard_uses_are_flowers():
    import flower.events

    source = Path(flower.events.__file__).read_text()
    for name in FLOWER_METRICS:
        assert f"'{name.removesuffix('_total').removesuffix('_bucket')}" in source, name


def test_workers_serve_metrics_where_prometheus_and_the_healthcheck_look():
    from lipfarm.cli import build_parser

    parser = build_parser()
    for where, args in _commands():
        parsed = parser.parse_args([str(a) for a in args])
        if parsed.command == "worker":
            assert parsed.metrics_port == 9808 and parsed.metrics_address == "0.0.0.0", where
    annotated = [doc for _n, doc in _workloads() if doc["spec"]["template"]["metadata"].get("annotations")]
    for doc in annotated:
        annotations = doc["spec"]["template"]["metadata"]["annotations"]
        ports = {p["containerPort"] for c in doc["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        assert int(annotations["prometheus.io/port"]) in ports, doc["metadata"]["name"]
    assert {"lipfarm-api", "lipfarm-render", "lipfarm-jobs"} <= {d["metadata"]["name"] for d in annotated}
