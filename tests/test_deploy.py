"""The deployment files stay in step with the CLI and the settings they configure."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from common.config import SETTINGS
from scheduler.cli import build_parser

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
KNOWN = {s.env for s in SETTINGS}


def _commands_and_env():
    """(lipfarm arguments, environment names) of every container the deploy files run."""
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        if service.get("image", "").startswith("lipfarm"):
            yield f"compose {name}", service["command"], set(service.get("environment", {}))
    for path in (DEPLOY / "k8s").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "ConfigMap":
                yield f"{path.name} ConfigMap", None, set(doc["data"])
            if doc and doc.get("kind") == "Deployment":
                for container in doc["spec"]["template"]["spec"]["containers"]:
                    yield (f"{path.name} {doc['metadata']['name']}", container["args"],
                           {e["name"] for e in container.get("env", [])})


def test_every_container_command_parses_and_sets_only_known_settings():
    parser = build_parser()
    seen = 0
    for where, args, env in _commands_and_env():
        if args is not None:
            parser.parse_args(args)  # exits (SystemExit) on a flag the CLI does not have
        unknown = {name for name in env if name.startswith("LIPFARM_") and name not in KNOWN}
        assert not unknown, (where, unknown)
        seen += 1
    assert seen >= 7


def test_dockerfiles_set_only_known_settings():
    for path in DEPLOY.glob("Dockerfile*"):
        names = set(re.findall(r"\b(LIPFARM_[A-Z0-9_]+)=", path.read_text()))
        assert names and names <= KNOWN, (path.name, names - KNOWN)


def test_autoscaling_watches_every_priority_list_of_the_render_queue():
    from common.celery_app import PRIORITIES

    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "autoscaling.yaml").read_text()))
    watched = {t["metadata"]["listName"] for t in docs[0]["spec"]["triggers"]}
    for step in PRIORITIES.values():
        assert ("render" if step == 0 else f"render:{step}") in watched
