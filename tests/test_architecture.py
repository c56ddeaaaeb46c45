"""The architecture rules of ``docs/architecture.md``, checked on the source (tests excluded).

* the import contracts of ``pyproject.toml`` (``[tool.importlinter]``) hold: the layers
  ``microverse | training | evaluation | simulator | media``, a serving core without ``training``, and no
  import loop between sibling modules inside a package;
* no function, method or class ranks D or worse in cyclomatic complexity (radon);
* ``media/video.py`` is the only mp4 writer.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from radon.complexity import cc_rank, cc_visit

from tests.conftest import REPO_ROOT

SOURCE = ("microverse", "training", "evaluation", "simulator", "media", "load_tests", "scripts", "service.py")
"""Folders and files of the source, relative to the repository root."""
MP4_WRITER = Path("media/video.py")
"""The one module allowed to encode mp4."""
ENCODER_CALLS = frozenset({"add_stream", "write_frames", "VideoWriter", "get_writer", "mimwrite", "mimsave"})
"""Calls that open a video encoder (PyAV, imageio-ffmpeg, OpenCV, imageio)."""


def _source_files() -> Iterator[Path]:
    for entry in SOURCE:
        path = REPO_ROOT / entry
        if path.is_dir():
            yield from sorted(path.rglob("*.py"))
        elif path.is_file():
            yield path


def test_import_contracts_hold():
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint_imports), "--no-cache"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"lint-imports failed:\n{result.stdout}\n{result.stderr}"


def test_no_block_ranks_d_or_worse():
    offenders = [
        f"{path.relative_to(REPO_ROOT)}:{block.lineno} {block.fullname}: {cc_rank(block.complexity)} "
        f"({block.complexity})"
        for path in _source_files()
        for block in cc_visit(path.read_text(encoding="utf-8"))
        if cc_rank(block.complexity) >= "D"
    ]
    assert not offenders, "radon grade D or worse:\n" + "\n".join(offenders)


def _code_strings(tree: ast.AST) -> Iterator[ast.Constant]:
    """The string constants of ``tree`` that code uses: docstrings (a string alone as a statement) aside."""
    docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node


def _encoder_uses(path: Path) -> Iterator[str]:
    """Where ``path`` opens a video encoder or names libx264 in code (docstrings and comments aside)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    where = path.relative_to(REPO_ROOT)
    for call in (node for node in ast.walk(tree) if isinstance(node, ast.Call)):
        name = getattr(call.func, "attr", None) or getattr(call.func, "id", None)
        if name in ENCODER_CALLS:
            yield f"{where}:{call.lineno} calls {name}("
    for node in _code_strings(tree):
        if "libx264" in node.value:
            yield f"{where}:{node.lineno} names libx264"


def test_exactly_one_mp4_writer():
    uses = {path: list(_encoder_uses(path)) for path in _source_files()}
    others = [use for path, found in uses.items() if path.relative_to(REPO_ROOT) != MP4_WRITER for use in found]
    assert not others, "mp4 encoding outside media/video.py:\n" + "\n".join(others)
    assert uses.get(REPO_ROOT / MP4_WRITER), f"{MP4_WRITER} encodes no mp4"
