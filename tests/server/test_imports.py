"""The server depends on the core package only: it never imports torch, the exporter or training."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SERVER = REPO / "server"
FORBIDDEN = ("torch", "export", "training")


def forbidden_imports(source: str, where: str) -> list[str]:
    """`where:line: module` for every import of a forbidden package, at module level or inside a function."""
    found = []
    for node in ast.walk(ast.parse(source, filename=where)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        else:
            continue  # relative imports stay inside the server package
        found += [f"{where}:{node.lineno}: {m}" for m in modules if m.split(".")[0] in FORBIDDEN]
    return found


def test_the_scan_finds_lazy_and_nested_imports() -> None:
    source = (
        "import numpy\nfrom server.config import Settings\n"
        "def f():\n    from export import tensorrt_engine\n    import torch.nn as nn\n"
        "class C:\n    def g(self):\n        from training.cli import main\n"
    )
    assert forbidden_imports(source, "sample.py") == [
        "sample.py:4: export",
        "sample.py:5: torch.nn",
        "sample.py:8: training.cli",
    ]


def test_server_source_imports_no_torch_export_or_training() -> None:
    files = sorted(SERVER.rglob("*.py"))
    assert len(files) > 5, f"too few Python files under {SERVER}: {files}"
    found = [
        line
        for path in files
        for line in forbidden_imports(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
    ]
    assert found == [], "the server must not import torch, export or training:\n" + "\n".join(found)


def test_importing_the_server_loads_no_torch_export_or_training() -> None:
    code = (
        "import server.app, server.backends, server.cli, server.tensorrt_runner, sys; "
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}); "
        "assert not loaded, loaded"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
