"""The shape of the code: three layers with imports only downward, no cycles, no pickles.

``imgclust/`` is the library (it never imports Prefect, ``tasks`` or ``flows``; its CLI, which
starts flows, is the one exception), ``tasks/`` wraps library functions as Prefect tasks, ``flows/``
composes tasks.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "imgclust"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every import in a file, at any depth (function-level too)."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import; use the absolute module name")
    return found


def files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def test_the_library_never_imports_prefect_tasks_or_flows_except_its_cli():
    bad = []
    for path in files(LIBRARY):
        if path.name == "cli.py" and path.parent == LIBRARY:
            continue
        for mod, _, line in imports_of(path):
            if mod.split(".")[0] in {"prefect", "prefect_dask", "tasks", "flows"}:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod}")
    assert not bad, "\n".join(bad)


def test_tasks_only_wrap_the_library_and_flows_only_compose_tasks():
    for path in files(ROOT / "tasks"):
        for mod, _, line in imports_of(path):
            assert mod.split(".")[0] not in {"flows", "tasks"}, f"{path.relative_to(ROOT)}:{line} imports {mod}"
        tree = ast.parse(path.read_text())
        for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
            assert fn.end_lineno - fn.lineno < 8, f"{path.relative_to(ROOT)}: {fn.name} is more than a wrapper"
    for path in files(ROOT / "flows"):
        for mod, _, line in imports_of(path):
            assert not mod.startswith("flows.") or path.name == "__init__.py", f"{path}:{line} imports {mod}"


def test_no_module_imports_another_modules_private_names():
    bad = []
    for folder in ("imgclust", "tasks", "flows"):
        for path in files(ROOT / folder):
            for mod, names, line in imports_of(path):
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                if private and mod.split(".")[0] in {"imgclust", "tasks", "flows"}:
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {', '.join(private)} from {mod}")
    assert not bad, "\n".join(bad)


def test_the_library_has_no_import_cycles():
    modules = {module_name(p): p for p in files(LIBRARY)}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for mod, names, _ in imports_of(path):
            if not mod.startswith("imgclust"):
                continue
            for candidate in [f"{mod}.{n}" for n in names] + [mod]:
                if candidate in modules and candidate != name:
                    deps.add(candidate)
                    break
        graph[name] = deps - {"imgclust"}  # the package itself only carries the version
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_nothing_loads_a_pickle_from_a_run():
    """No loader may run code from a run's files: no pickle, joblib, ``weights_only=False`` or
    ``allow_pickle=True`` anywhere in the library, the tasks or the flows."""
    bad = []
    for folder in ("imgclust", "tasks", "flows"):
        for path in files(ROOT / folder):
            tree = ast.parse(path.read_text())
            for mod, _, line in imports_of(path):
                if mod.split(".")[0] in {"pickle", "joblib", "cloudpickle", "dill", "shelve", "marshal"}:
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod}")
            for node in ast.walk(tree):
                if isinstance(node, ast.keyword) and node.arg in {"weights_only", "allow_pickle"}:
                    ok = isinstance(node.value, ast.Constant) and node.value.value is (node.arg == "weights_only")
                    if not ok:
                        bad.append(f"{path.relative_to(ROOT)}:{node.value.lineno} {node.arg}=...")
                if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "load" and \
                        getattr(node.func.value, "id", "") == "torch":
                    if not any(k.arg == "weights_only" for k in node.keywords):
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno} torch.load without weights_only=True")
                if isinstance(node, ast.Attribute) and node.attr in {"read_pickle", "to_pickle"}:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.attr}")
    assert not bad, "\n".join(bad)


def test_commands_that_run_no_flow_never_import_prefect(finished_run):
    """``report``, ``evaluate`` and ``neighbors`` read a run and start no Prefect server."""
    root, out, _, _ = finished_run
    code = ("import sys; from imgclust.cli import main; rc = main(sys.argv[1:]); "
            "assert rc == 0, rc; assert 'prefect' not in sys.modules, 'prefect was imported'")
    for args in (["report", str(out)], ["evaluate", str(out), "--labels", "parent-folder"],
                 ["neighbors", str(out), "set0/digit_0/img000.png", "-k", "2"]):
        r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (args, r.stderr[-2000:])


def test_dask_workers_run_the_stages_without_prefect(corpus, tmp_path):
    """The stages submit library functions; a worker that ran discover, ingest and encode has not
    imported Prefect."""
    from distributed import Client, LocalCluster

    from imgclust.runstore import Location, RunStore
    from imgclust.stages.discover import discover
    from imgclust.stages.ingest import PixelSpec, ingest

    root, _ = corpus
    store = RunStore(str(tmp_path / "out"))
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                      host="127.0.0.1") as cluster, Client(cluster, set_as_default=False) as client:
        discover(Location(str(root)), store, client)
        ingest(Location(str(root)), store, PixelSpec((8, 8), True), 16, client)
        seen = client.run(lambda: sorted(m for m in sys.modules if m.split(".")[0] in {"prefect", "tasks", "flows"}))
    assert seen and all(mods == [] for mods in seen.values()), seen
