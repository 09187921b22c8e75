from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_strict_and_public_signatures() -> None:
    # strict includes warn_unused_ignores: each `type: ignore` in typing_check.py must
    # stand on a real error, so a signature that stopped checking arguments fails here.
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "asyncpool", "tests/typing_check.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
