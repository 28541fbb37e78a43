"""The repository stands on its own, its package's imports run downhill, and CI runs both tiers of
tests. Reads text only (no TensorFlow), so it is fast."""

import ast
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "normtf"
TEXT = {".md", ".py", ".toml", ".json", ".csv", ".cfg", ".txt", ".yml", ".yaml", ""}  # "": .ci/run
# Outside the repository: the study's write-up this project was started from. docs/study.md holds
# its facts, so a clone needs nothing beside it. (Spelt in pieces so that this file passes too.)
OUTSIDE = re.compile(r"\bshared" + "/|" + "REFERENCE" + r"\.md")


def project_files():
    """Every text file of the project: hidden directories (.git, .venv, caches) left out, .ci kept."""
    for directory, subdirectories, files in os.walk(ROOT):
        subdirectories[:] = [d for d in subdirectories if not (d.startswith(".") and d != ".ci" or d == "__pycache__"
                                                             or d.endswith(".egg-info"))]
        yield from (Path(directory, name) for name in files if Path(name).suffix in TEXT)


def test_nothing_refers_to_files_outside_the_repository():
    files = list(project_files())
    assert {ROOT / "README.md", ROOT / ".ci" / "run", ROOT / "docs" / "study.md", PACKAGE / "config.py"} <= set(files)
    found = [f"{path.relative_to(ROOT)}:{n}" for path in files
             for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if OUTSIDE.search(line)]
    assert not found, "cite docs/study.md for the study's facts: " + ", ".join(found)


def imports(path: Path) -> set[str]:
    """The normtf modules a file imports, at module level or inside a function, by module name."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "normtf"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "normtf":
            # from normtf import data (a module) or from normtf.data import load (a name in a module)
            found |= ({f"normtf.{alias.name}" for alias in node.names} if node.module == "normtf" else {node.module})
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path.name}: relative import; normtf names its modules in full")
    return {name.removesuffix(".__init__") for name in found}


def import_graph() -> dict[str, set[str]]:
    modules = {f"normtf.{p.stem}" if p.stem != "__init__" else "normtf": p for p in PACKAGE.glob("*.py")}
    return {name: imports(path) & set(modules) - {name} for name, path in modules.items()}


def cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of the graph (a list of modules, the first repeated at the end), or []."""
    state = {}  # module -> "open" while its imports are walked, "done" after

    def walk(node, path):
        state[node] = "open"
        for other in sorted(graph.get(node, ())):
            if state.get(other) == "open":
                return path[path.index(other):] + [other]
            if other not in state and (found := walk(other, path + [other])):
                return found
        state[node] = "done"
        return []

    for start in sorted(graph):
        if start not in state and (found := walk(start, [start])):
            return found
    return []


def test_the_cycle_finder_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_the_import_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "normtf.config" in graph["normtf.models"]  # at module level
    assert {"normtf.study", "normtf.bench"} <= graph["normtf.cli"]  # inside the commands' functions
    assert "normtf.torch_reference" in graph["normtf.bench"]  # `from normtf import torch_reference`


def test_imports_run_downhill_no_module_imports_one_that_imports_it():
    found = cycle(import_graph())
    assert not found, "import cycle: " + " -> ".join(found)


def test_ci_runs_the_readmes_tier_then_the_slow_one_and_a_tier_without_tests_is_no_failure():
    """.ci/run ends with the fast tier (the README's test command) and the slow one (the command
    docs/development.md gives); pytest's exit code 5, no test selected, lets CI go on, any other
    failure stops it. Run with a stand-in for python that exits with each code."""
    script = (ROOT / ".ci" / "run").read_text().splitlines()
    tier = next(line for line in script if line.startswith("tier()"))
    assert 'python -m pytest -q "$@"' in tier and script[-2:] == ["tier", "tier -m slow"]
    assert "&& python -m pytest -q\n```" in (ROOT / "README.md").read_text()
    assert "`python -m pytest -q -m slow`" in (ROOT / "docs" / "development.md").read_text()
    for code in (0, 5, 1, 2):
        fake = f"set -euo pipefail\npython() {{ echo \"$*\"; return {code}; }}\n{tier}\ntier\ntier -m slow\n"
        ran = subprocess.run(["bash", "-c", fake], capture_output=True, text=True, timeout=60)
        if code in (0, 5):
            assert ran.returncode == 0 and ran.stdout == "-m pytest -q\n-m pytest -q -m slow\n", code
        else:
            assert ran.returncode != 0 and ran.stdout == "-m pytest -q\n", code
