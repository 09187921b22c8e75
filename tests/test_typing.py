"""Typing: the package under mypy --strict, its public signatures, and what a user's
own code sees after the README's editable install."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

USER_SCRIPT = '''
from typing import assert_type

from asyncpool import ResilientPool


def f(x: int) -> str:
    return str(x)


async def main(xs: list[int]) -> None:
    async with ResilientPool(max_workers=2) as pool:
        assert_type(await pool.map(f, xs), list[str])
        assert_type(await pool.run(f, 1), str)
'''


def _mypy(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental",
                           *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_mypy_strict_and_public_signatures() -> None:
    # strict includes warn_unused_ignores: each `type: ignore` in typing_check.py must
    # stand on a real error, so a signature that stopped checking arguments fails here.
    proc = _mypy("asyncpool", "tests/typing_check.py", cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_users_script_outside_the_repository_sees_the_types(tmp_path: Path) -> None:
    # As installed by the README (`pip install -e`): mypy must find the package (it
    # could not see setuptools' editable finder) and infer list[str], not Any.
    script = tmp_path / "user.py"
    script.write_text(USER_SCRIPT)
    proc = _mypy(str(script), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "import-not-found" not in proc.stdout
