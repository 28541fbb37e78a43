"""The repository stands on its own. Reads text only (no TensorFlow), so it is fast."""

import os
import re
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

