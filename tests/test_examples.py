"""Every example runs to completion by itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import ROOT, run_python

EXAMPLES = ROOT / "examples"


@pytest.mark.slow
@pytest.mark.parametrize(("name", "expect"), [
    ("quickstart.py", "served by: process"),
    ("web_service.py", "/health while computing"),
    ("pipeline.py", "rate-limited calls"),
    ("faults.py", "all correct=True"),
])
def test_example_runs(name: str, expect: str) -> None:
    proc = run_python(str(EXAMPLES / name), timeout=180)
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
    proc = run_python(str(script), timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("process PoolStatistics("), proc.stdout
