"""python -m asyncpool: help, demo, and the resumable JSONL map."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "asyncpool", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, **kw)  # type: ignore[call-overload, no-any-return]


def test_help_lists_subcommands() -> None:
    out = _cli("--help")
    assert out.returncode == 0 and "demo" in out.stdout and "map" in out.stdout


def test_demo() -> None:
    out = _cli("demo", "--limit", "300000", "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "25997 primes below 300,000" in out.stdout
    assert "served by the 'process' rung" in out.stdout and "tasks_completed" in out.stdout


def test_map_writes_in_order_and_reports_bad_lines(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("1\n2\nnot json\n4\n[5]\n")
    dst = tmp_path / "out.jsonl"
    out = _cli("map", "tests.tasks:square", str(src), "-o", str(dst), "--no-progress")
    assert out.returncode == 1  # some lines failed, and the run still finished
    records = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3, 4, 5]
    assert records[0]["result"] == 1 and records[3]["result"] == 16
    assert "line 3 is not valid JSON" in records[2]["error"]
    assert "TypeError" in records[4]["error"]


def test_resume_after_a_killed_run_loses_and_repeats_nothing(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(f"{i}\n" for i in range(300)))
    dst = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "asyncpool", "map", "tests.tasks:slow_echo", str(src), "-o",
           str(dst), "--no-progress", "--workers", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if dst.exists() and dst.read_text().count("\n") >= 40:
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its workers, mid-run
        proc.wait()
    written = dst.read_text().count("\n")
    assert 40 <= written < 300
    out = _cli("map", "tests.tasks:slow_echo", str(src), "-o", str(dst), "--resume",
               "--no-progress")
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r["line"] for r in records] == list(range(1, 301))
    assert [r["result"] for r in records] == list(range(300))
