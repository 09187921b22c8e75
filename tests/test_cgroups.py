"""Real exhaustion: a pids cgroup (no thread, no process left) and a memory cgroup (a
real OOM kill), around a child interpreter. They need root and a writable cgroup
hierarchy; elsewhere they skip and say why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import ROOT, remove_cgroup

SCENARIO = ROOT / "tests" / "_cgroup_scenario.py"
pytestmark = [pytest.mark.cgroup, pytest.mark.slow]


def _run(*args: str) -> dict[str, object]:
    proc = subprocess.run([sys.executable, str(SCENARIO), *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcome: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(outcome))
    return outcome


@pytest.mark.parametrize(("extra", "serving"), [(0, "inline"), (1, "inline"),
                                                (2, "process"), (4, "process")])
def test_map_survives_a_pids_limit_and_climbs_back(pids_cgroup: Path, extra: int,
                                                   serving: str) -> None:
    # extra 0: not even the fork server starts, nor a thread; 1: the fork server but no
    # worker (and no thread left); 2: one worker of two; 4: both.
    outcome = _run("pids", str(pids_cgroup), str(extra))
    assert outcome["rung"] == serving, outcome
    assert outcome["correct"] is True
    assert outcome["after_lift"] == "process" and outcome["workers_after"] == 2, outcome
    assert outcome["correct_after"] is True


def test_a_ladder_with_nothing_to_fall_back_to_says_the_pool_is_unavailable(
        pids_cgroup: Path) -> None:
    # The last rung's own error reached the caller: a bare BlockingIOError, or the
    # pool's private RungUnavailable.
    outcome = _run("only", str(pids_cgroup))
    assert outcome["error"] == "PoolUnavailable", outcome
    assert outcome["cause"] in ("BlockingIOError", "RuntimeError"), outcome
    assert outcome["after"] is True


@pytest.fixture
def memory_cgroup() -> Iterator[Path]:
    root = Path("/sys/fs/cgroup/memory")
    if not (root / "cgroup.procs").exists():
        pytest.skip("no cgroup v1 memory controller is mounted on this machine")
    path = root / f"asyncpool-test-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir()
        (path / "memory.limit_in_bytes").write_text(str(400 << 20))
    except OSError as exc:
        pytest.skip(f"cannot create a memory cgroup under {root} ({exc}); run as root")
    try:
        yield path
    finally:
        remove_cgroup(path, root)


def test_an_item_the_oom_killer_stops_is_isolated(memory_cgroup: Path) -> None:
    outcome = _run("memory", str(memory_cgroup))
    assert outcome["crashed"] == [37], outcome
    assert outcome["exitcode"] == -9  # SIGKILL from the OOM killer
    assert outcome["others_ok"] is True and outcome["after"] is True
