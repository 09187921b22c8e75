"""Real thread and process exhaustion: a pids cgroup around a child interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

SCENARIO = Path(__file__).with_name("_pids_scenario.py")


def _pids_root() -> Path | None:
    """The pids hierarchy: its own mount on cgroup v1, the unified root on v2."""
    v1, v2 = Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup")
    if (v1 / "cgroup.procs").exists():
        return v1
    controllers = v2 / "cgroup.controllers"
    if controllers.exists() and "pids" in controllers.read_text().split():
        return v2
    return None


@pytest.fixture
def pids_cgroup() -> Iterator[Path]:
    root = _pids_root()
    if root is None:
        pytest.skip("no pids cgroup controller is mounted on this machine")
    path = root / f"asyncpool-test-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a pids cgroup under {root} ({exc}); run as root "
                    "on a machine with a writable cgroup hierarchy")
    if not (path / "pids.max").exists():
        path.rmdir()
        pytest.skip(f"{root} has no pids controller for new groups")
    try:
        yield path
    finally:
        # Move anything left (nothing should be) back to the root and remove the group.
        for pid in (path / "cgroup.procs").read_text().split():
            try:
                (root / "cgroup.procs").write_text(pid)
            except OSError:
                pass
        path.rmdir()


@pytest.mark.cgroup
@pytest.mark.parametrize("extra", [0, 1, 2, 4])
def test_map_survives_pids_limit_and_climbs_back(pids_cgroup: Path, extra: int) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCENARIO), str(pids_cgroup), str(extra)],
        capture_output=True, text=True, timeout=100,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcome = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(outcome))
    assert outcome["rung"] in ("thread", "inline"), outcome
    assert outcome["correct"] is True
    assert outcome["after_lift"] == "process", outcome
    assert outcome["correct_after"] is True
