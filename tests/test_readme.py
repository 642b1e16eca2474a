"""The README's promises: its first two lines are the commands, its examples run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def run_readme_example(name: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the README's ``<!-- readme-example: NAME -->`` python block as a script in
    ``cwd``, as a user who copied it would."""
    m = re.search(
        rf"<!-- readme-example: {re.escape(name)} -->\n```python\n(.*?)```",
        README.read_text(),
        re.S,
    )
    assert m, f"example block {name!r} not found in the README"
    script = cwd / "example.py"
    script.write_text(m.group(1))
    return subprocess.run(
        [sys.executable, str(script)], cwd=cwd, capture_output=True, text=True, timeout=110
    )


def test_readme_starts_with_the_two_commands() -> None:
    """The README opens with the demo command and the test command that .ci/run runs."""
    lines = [ln for ln in README.read_text().splitlines() if ln.strip()]
    assert lines[0].startswith("# pilotfish") and lines[1] == "```sh"
    assert "pilotfish demo" in lines[2] and "pytest" in lines[3]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "grep -m2 '^python3 -m venv .venv' README.md" in ci


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_readme_dask_localcluster_example(tmp_path: Path) -> None:
    """The "Running on a cluster" LocalCluster example runs as written."""
    pytest.importorskip("distributed")
    out = run_readme_example("dask-localcluster", tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "285"


@pytest.mark.timeout(120)
def test_readme_switching_from_processpoolexecutor(tmp_path: Path) -> None:
    """The "Switching from ProcessPoolExecutor" example runs as written."""
    out = run_readme_example("ppe-switch", tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "90"
