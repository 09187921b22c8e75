"""Every example runs to completion by itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.slow
@pytest.mark.parametrize(("name", "expect"), [
    ("quickstart.py", "served by: process"),
    ("web_service.py", "/health while computing"),
    ("pipeline.py", "rate-limited calls"),
    ("faults.py", "all correct=True"),
])
def test_example_runs(name: str, expect: str) -> None:
    proc = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True,
                          text=True, timeout=180, cwd=EXAMPLES.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expect in proc.stdout, proc.stdout[-3000:]
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, (
        proc.stderr[-3000:])
    print(proc.stdout)


def test_readme_example_runs(tmp_path: Path) -> None:
    text = (EXAMPLES.parent / "README.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    script = tmp_path / "readme_example.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=180, cwd=EXAMPLES.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("process PoolStatistics("), proc.stdout
