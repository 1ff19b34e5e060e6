"""docs/architecture.md names every module of the package, and only modules that exist."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "service" / "backpack_vault"
DOC = ROOT / "docs" / "architecture.md"


def _modules() -> set[str]:
    """``core/keys``, ``checks``, ``daemon/__init__``... for every module of the package."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("").as_posix()
        if rel.endswith("/__init__") and path.stat().st_size < 200:
            continue  # a package marker with a one-line docstring
        found.add(rel)
    return found


def _mapped() -> set[str]:
    text = DOC.read_text(encoding="utf-8")
    table = text.split("## Module map", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for cell in re.findall(r"^\| ([^|]+) \|", table, re.MULTILINE):
        for name in re.findall(r"`([^`]+)`", cell):
            names.add(name.rstrip("/"))
    return names


class TestArchitecturePage:
    def test_every_module_is_on_the_map(self) -> None:
        """A new module gets a line in docs/architecture.md."""
        mapped = _mapped()
        missing = sorted(m for m in _modules() if m not in mapped and m.split("/")[0] not in mapped)
        assert missing == []

    def test_every_line_names_a_module_that_exists(self) -> None:
        """No line describes a module that is gone."""
        modules = _modules() | {m.split("/")[0] for m in _modules()}
        assert sorted(_mapped() - modules - {"__init__", "__main__"}) == []

    def test_the_import_contracts_hold(self) -> None:
        """The layers the page draws are the ones lint-imports enforces."""
        lint = Path(sys.executable).parent / "lint-imports"
        done = subprocess.run(
            [str(lint)], cwd=ROOT, capture_output=True, text=True, check=False, timeout=120
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "BROKEN" not in done.stdout
