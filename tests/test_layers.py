"""Layers point down (DESIGN §2): ptutils/ <- workers/ <- orchestrator/.

Read from the source with `ast`, so an import inside a function counts as much as one
at the top of a module.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "ptutils": ("orchestrator", "workers", "celery", "kombu"),
    "workers": ("orchestrator",),
}
"""Package -> top-level packages its modules must not import."""


def imported_modules(root: Path, path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, wherever it sits."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from ..a import b
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.append((node.lineno, module))
    return found


def violations(root: Path, package: str, forbidden: tuple[str, ...]) -> list[str]:
    """`file:line imports module` for each import of a forbidden package under root/package."""
    bad = []
    for path in sorted((root / package).rglob("*.py")):
        for line, module in imported_modules(root, path):
            if module.split(".")[0] in forbidden:
                bad.append(f"{path.relative_to(root)}:{line} imports {module}")
    return bad


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers_point_down(package):
    assert violations(ROOT, package, FORBIDDEN[package]) == []


def test_the_check_sees_lazy_and_relative_imports(tmp_path):
    (tmp_path / "workers" / "sub").mkdir(parents=True)
    (tmp_path / "workers" / "tasks.py").write_text(
        "import os\n\ndef beat():\n    from orchestrator.reconcile import reconcile_once\n")
    (tmp_path / "workers" / "sub" / "x.py").write_text(
        "from .. import app\nfrom ...orchestrator import cli\nimport orchestrator.cli as c\n")
    assert violations(tmp_path, "workers", ("orchestrator",)) == [
        "workers/sub/x.py:2 imports orchestrator",
        "workers/sub/x.py:3 imports orchestrator.cli",
        "workers/tasks.py:4 imports orchestrator.reconcile",
    ]


@pytest.mark.parametrize("module", ["ptutils.plan", "orchestrator.status", "orchestrator.cli"])
def test_the_plan_and_the_cli_start_without_torch(module):
    """`ptutils status` and `--help` answer at once: what they import never loads torch
    (1.5 s and 230 MiB); only building or loading a session does."""
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m == 'torch'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"importing {module} loads torch"


def _cli_imports(*args: str) -> tuple[set[str], str]:
    """Run `ptutils ARGS` in a fresh interpreter: (the modules it imported, output).
    Read from `-X importtime`, which logs each import as it happens."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "orchestrator.cli", *args],
                         capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    imported = {line.rpartition("|")[2].strip() for line in out.stderr.splitlines()
                if line.startswith("import time:")}
    return imported, out.stdout


def test_commands_that_touch_no_tensor_never_import_torch(tmp_path, mongo_uri, redis_url):
    """`status`, `stats`, `submit --help`, `reconcile` on either store start without
    torch (1.5 s, 230 MiB): the MongoDB store imports the codec lazily (issue 12)."""
    from ptutils.store import StatPoint, new_session_doc, open_store

    local = str(tmp_path / "runs")
    for url in (local, mongo_uri):
        with open_store(url) as store:
            doc = store.create_session(new_session_doc("s", {"session": {}}, "h", 10))
            store.write_statistics(doc["_id"], [StatPoint("train", 1, "loss", 0.5)])
    commands = [
        ("status", "--store", local), ("status", "--store", mongo_uri),
        ("status", "--all", "--json", "--store", mongo_uri),
        ("stats", "s", "--json", "--store", mongo_uri), ("stats", "s", "--store", local),
        ("submit", "--help"), ("status", "--help"),
        ("reconcile", "--store", mongo_uri, "--broker", redis_url),
    ]
    for args in commands:
        imported, output = _cli_imports(*args)
        assert "torch" not in imported, f"`ptutils {' '.join(args)}` imports torch:\n{output}"
        if args[0] in ("status", "submit"):  # numpy costs 65 ms: only curves need it
            assert "numpy" not in imported, f"`ptutils {' '.join(args)}` imports numpy"
        if args[0] == "status" and local in args:  # ~35 ms each: configs, trust policy
            # (pymongo imports importlib.metadata itself: the local store is the check)
            for lazy in ("yaml", "importlib.metadata"):
                assert lazy not in imported, f"`ptutils {' '.join(args)}` imports {lazy}"
        if args[0] == "status" and "--help" not in args:
            assert "s " in output or '"name": "s"' in output, output
