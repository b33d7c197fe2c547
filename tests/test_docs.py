"""Every Python snippet in README.md and docs/ runs as written.

Blocks are run as scripts, each in a fresh directory. The quick start's two-file setup
(``# mymodule.py`` and ``# client.py``) is run the way the page describes it: a real
``acall worker mymodule:app`` process, then the client.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.slow
_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def _blocks() -> list[tuple[str, str]]:
    found = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for i, code in enumerate(_BLOCK.findall(page.read_text(encoding="utf-8"))):
            found.append((f"{page.name}#{i}", code))
    return found


BLOCKS = _blocks()
STANDALONE = [(n, c) for n, c in BLOCKS if not c.startswith(("# mymodule.py", "# client.py"))]


def _env(cwd: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(cwd), str(ROOT)]))


def test_there_are_snippets() -> None:
    assert len(BLOCKS) >= 10
    assert any(c.startswith("# client.py") for _, c in BLOCKS)


def _run_script(script: Path) -> subprocess.CompletedProcess[str]:
    """Run a Python file in its own directory, with the test environment."""
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=script.parent,
        env=_env(script.parent),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(("name", "code"), STANDALONE, ids=[n for n, _ in STANDALONE])
def test_snippet_runs(name: str, code: str, tmp_path: Path) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(code, encoding="utf-8")
    result = _run_script(script)
    assert result.returncode == 0, f"{name}:\n{result.stdout}\n{result.stderr}"


def test_quickstart_with_a_worker_process(tmp_path: Path) -> None:
    module = next(c for _, c in BLOCKS if c.startswith("# mymodule.py"))
    client = next(c for _, c in BLOCKS if c.startswith("# client.py"))
    (tmp_path / "mymodule.py").write_text(module, encoding="utf-8")
    (tmp_path / "client.py").write_text(client, encoding="utf-8")
    worker = subprocess.Popen(
        [sys.executable, "-m", "acall", "worker", "mymodule:app"],
        cwd=tmp_path,
        env=_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        result = _run_script(tmp_path / "client.py")
    finally:
        worker.terminate()
        assert worker.wait(30) == 0
    assert result.returncode == 0, result.stdout + result.stderr
