"""The structure rules the code keeps (docs/architecture.md), checked on its import graph.

- no import cycles between lipfarm's modules (imports inside functions included: a lazy import
  still ties two modules together);
- the scheduler imports from ``worker`` only where it renders (the local renderer);
- nothing but ``common.state`` talks to Redis about lipfarm's state: ``common.celery_app`` may
  reach the broker's own lists (Celery's, not lipfarm's keys), and the benchmarks flush a database
  of their own.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The role folders at the top of the repository, each installed as lipfarm.<folder> (pyproject.toml).
PACKAGES = ("lipfarm", "common", "job", "worker", "scheduler", "api", "client", "cli", "benchmarks", "demo")
RENDERING_SCHEDULER_MODULES = {"lipfarm.scheduler.local"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return ".".join(parts if parts[0] == "lipfarm" else ["lipfarm", *parts])


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def _imports(path: Path, known: set[str]) -> set[str]:
    """lipfarm modules imported anywhere in ``path`` (``from a import b`` counts ``a.b`` if a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in known}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {}
    for name, path in modules.items():
        # importing a.b.c also runs a and a.b: but a package importing its own submodules is not a cycle
        graph[name] = {m for m in _imports(path, known) if m != name and not m.startswith(name + ".")}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()))


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_scheduler_imports_worker_only_where_it_renders():
    offenders = {name: sorted(m for m in deps if m.startswith("lipfarm.worker"))
                 for name, deps in _graph().items()
                 if name.startswith("lipfarm.scheduler") and name not in RENDERING_SCHEDULER_MODULES}
    assert {name: deps for name, deps in offenders.items() if deps} == {}


def test_only_the_state_store_talks_to_redis():
    talkers = []
    for name, path in _modules().items():
        if name.startswith(("lipfarm.common.state", "lipfarm.common.celery_app", "lipfarm.benchmarks")):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            imported = (isinstance(node, ast.Import) and any(a.name == "redis" for a in node.names)) or \
                       (isinstance(node, ast.ImportFrom) and node.module == "redis")
            if imported:
                talkers.append(name)
    assert talkers == []


# Which room may import which (docs/architecture.md): lower rooms never reach up. The CLI is the top:
# it starts every role. The scheduler reaches the worker only where it renders locally.
ROOM_IMPORTS = {
    "lipfarm": set(),
    "common": set(),
    "demo": {"common"},
    "job": {"common"},
    "worker": {"common", "job"},
    "scheduler": {"common", "job", "demo", "worker"},
    "api": {"common", "job", "scheduler", "demo"},
    "benchmarks": {"common", "job", "demo", "worker", "scheduler"},
    "client": set(),
    "cli": {"common", "job", "demo", "worker", "scheduler", "api", "benchmarks", "client"},
}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_rooms_import_only_the_rooms_below_them():
    reaching_up = sorted(f"{name} -> {dep}" for name, deps in _graph().items() for dep in deps
                         if _room(dep) != _room(name) and _room(dep) not in ROOM_IMPORTS[_room(name)])
    assert reaching_up == []


def test_every_room_is_a_known_room():
    assert {_room(name) for name in _modules()} == set(ROOM_IMPORTS)


def test_the_wheel_installs_one_lipfarm_namespace(tmp_path):
    """Nothing of lipfarm lands at the top of site-packages beside other packages' ``common``."""
    import subprocess
    import sys
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("lipfarm-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"lipfarm"}
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"lipfarm/common/state/store.py", "lipfarm/worker/tasks.py", "lipfarm/api/static/index.html",
            "lipfarm/cli/__init__.py", "lipfarm/job/endings.py"} <= names


def test_planning_arithmetic_imports_no_media_stack():
    """``common.plan`` cuts a timeline into chunks: integers, not audio decoding or inference."""
    import subprocess
    import sys

    probe = ("import sys, lipfarm.common.plan; print(sorted({m.split('.')[0] for m in sys.modules} & "
             "{'librosa', 'scipy', 'av', 'cv2', 'onnxruntime', 'openvino', 'numba', 'soxr'}))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
