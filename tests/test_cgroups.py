"""Real exhaustion: a pids cgroup (no thread, no process left) and a memory cgroup (a
real OOM kill), around a child interpreter. They need root and a writable cgroup
hierarchy; elsewhere they skip and say why."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import Cgroup, run_script

SCENARIO = "_cgroup_scenario.py"
pytestmark = [pytest.mark.cgroup, pytest.mark.slow]


def _run(*args: str) -> dict[str, object]:
    """The scenario's outcome (its last line of output, JSON)."""
    proc = run_script(SCENARIO, *args, env={"PYTHONFAULTHANDLER": "1"})
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


@pytest.mark.parametrize("fork_server", ["cold", "warm"])
def test_a_ladder_with_nothing_to_fall_back_to_says_the_pool_is_unavailable(
        pids_cgroup: Path, fork_server: str) -> None:
    # The last rung's own error reached the caller: a bare BlockingIOError, or the
    # pool's private RungUnavailable. The cause is the machine's error, whether the
    # fork server or this process failed to fork (the first was RungUnavailable).
    outcome = _run("only", str(pids_cgroup), fork_server)
    assert outcome["error"] == "PoolUnavailable", outcome
    assert outcome["cause"] in ("BlockingIOError", "RuntimeError"), outcome
    assert outcome["after"] is True


@pytest.fixture
def memory_cgroup() -> Iterator[Path]:
    with Cgroup.create("memory", "memory.limit_in_bytes") as path:
        (path / "memory.limit_in_bytes").write_text(str(400 << 20))
        yield path


def test_an_item_the_oom_killer_stops_is_isolated(memory_cgroup: Path) -> None:
    outcome = _run("memory", str(memory_cgroup))
    assert outcome["crashed"] == [37], outcome
    assert outcome["exitcode"] == -9  # SIGKILL from the OOM killer
    assert outcome["others_ok"] is True and outcome["after"] is True
