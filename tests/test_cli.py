"""python -m asyncpool: help, demo, and the streamed, resumable JSONL map."""

from __future__ import annotations

import itertools
import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from .helpers import ROOT, run_code, run_python, settle


def _cli(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT,
         closed: bool = False) -> subprocess.CompletedProcess[str]:
    if closed:  # standard output closed, as `>&-` does
        return run_python("-m", "asyncpool", *args, cwd=cwd, timeout=120, env=env,
                          stderr=subprocess.PIPE, preexec_fn=lambda: os.close(1))
    return run_python("-m", "asyncpool", *args, cwd=cwd, timeout=120, env=env)


def _map_own_module(tmp_path: Path, source: str, lines: str, output: str = "out.jsonl"
                    ) -> subprocess.CompletedProcess[str]:
    """``map own:fn`` over ``lines``, module ``own`` being ``source``; the output goes
    to ``tmp_path/output`` (or standard output for ``-``)."""
    (tmp_path / "own.py").write_text(source)
    (tmp_path / "in.jsonl").write_text(lines)
    dst = output if output.startswith(("-", "/")) else str(tmp_path / output)
    return _cli("map", "own:fn", str(tmp_path / "in.jsonl"), "-o", dst, "--no-progress",
                cwd=tmp_path, env={"PYTHONPATH": str(ROOT)})


@pytest.fixture
def no_tqdm(tmp_path: Path) -> dict[str, str]:
    """An environment where importing tqdm fails, as in a plain install."""
    fake = tmp_path / "fake"
    (fake / "tqdm").mkdir(parents=True)
    (fake / "tqdm" / "__init__.py").write_text("raise ImportError('no tqdm here')\n")
    path = os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")])
    return {"PYTHONPATH": path}


def test_help_lists_subcommands_options_and_exit_codes() -> None:
    out = _cli("--help")
    assert out.returncode == 0 and "demo" in out.stdout and "map" in out.stdout
    assert "exit codes" in out.stdout
    sub = _cli("map", "--help")
    for option in ("--workers", "--no-progress", "--resume", "-v"):
        assert option in sub.stdout
    assert "worker processes" in sub.stdout and "no progress" in sub.stdout


@pytest.mark.parametrize("progress", [[], ["--no-progress"]])
def test_demo_with_and_without_tqdm(progress: list[str], no_tqdm: dict[str, str]) -> None:
    for env in (None, no_tqdm):
        out = _cli("demo", "--limit", "300000", *progress, env=env)
        assert out.returncode == 0, out.stderr
        assert "25997 primes below 300,000" in out.stdout
        assert "served by the 'process' rung" in out.stdout and "tasks_completed" in out.stdout
        assert "Traceback" not in out.stderr
        # Without tqdm, a counter: the pool's log line at INFO showed nothing.
        assert ("30 of 30 done" in out.stderr) == (env is no_tqdm and not progress)


def test_map_writes_in_order_and_reports_bad_lines(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text('1\n2\nnot json\n4\n[5]\n\n"text"\nNaN\n-Infinity\n')
    dst = tmp_path / "out.jsonl"
    out = _cli("map", "tests.tasks:square", str(src), "-o", str(dst), "--no-progress")
    assert out.returncode == 1, out.stderr  # some lines failed; the run still finished
    records = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3, 4, 5, 7, 8, 9]
    assert records[0]["result"] == 1 and records[3]["result"] == 16
    assert "line 3 is not valid JSON" in records[2]["error"]
    # Python's json reads them; JSON has no such values (nor does the output).
    assert "line 8 is not valid JSON (NaN is not a JSON value)" in records[6]["error"]
    assert "line 9 is not valid JSON (-Infinity is not" in records[7]["error"]
    assert records[4]["error"].startswith("TypeError")
    assert "_" not in records[2]["error"].split(":")[0]  # no private class names
    assert "1 blank line(s) skipped" in out.stderr


def test_a_function_may_be_a_class_attribute(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text('"ab"\n"cd"\n')
    dst = tmp_path / "out.jsonl"
    out = _cli("map", "builtins:str.upper", str(src), "-o", str(dst), "--no-progress")
    assert out.returncode == 0, out.stderr
    assert [json.loads(line)["result"] for line in dst.read_text().splitlines()] == [
        "AB", "CD"]


def test_closed_standard_error_or_input(tmp_path: Path) -> None:
    # Standard error closed: the event loop's file took its number, and with `-o -`
    # the function module's output went there (OSError: exit 2, no record); the
    # summary line went to the records. Standard input closed: a traceback.
    (tmp_path / "own.py").write_text("print('importing')\n"
                                     "def fn(x):\n    print('running', x)\n    return 2 * x\n")
    (tmp_path / "in.jsonl").write_text("1\n2\n3\n")
    command = [sys.executable, "-m", "asyncpool", "map", "own:fn"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([*command, str(tmp_path / "in.jsonl"), "-o", "-", "--no-progress"],
                         cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True,
                         timeout=120, preexec_fn=lambda: os.close(2))
    assert run.returncode == 0
    assert [json.loads(line)["result"] for line in run.stdout.splitlines()] == [2, 4, 6]
    run = subprocess.run([*command, "-", "-o", str(tmp_path / "out.jsonl")], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120,
                         preexec_fn=lambda: os.close(0))
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        "python -m asyncpool: error: cannot read standard input: it is closed"]


def test_a_result_that_is_not_json_is_that_lines_error(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("1\n2\n3\n")
    dst = tmp_path / "out.jsonl"
    out = _cli("map", "tests.tasks:object_on_two", str(src), "-o", str(dst),
               "--no-progress", "-v")
    assert out.returncode == 1, out.stderr
    records = [json.loads(line) for line in dst.read_text().splitlines()]
    assert records[0] == {"line": 1, "result": 1} and records[2] == {"line": 3, "result": 3}
    assert records[1]["error"].startswith("TypeError: the result is not JSON")


@pytest.mark.parametrize(("args", "message"), [
    (["map", "no_such_module:fn", "IN", "-o", "OUT"], "cannot import 'no_such_module'"),
    (["map", "no_such_module:fn", "IN", "-o", "OUT"], "put that folder on PYTHONPATH"),
    (["map", "tests.tasks:missing", "IN", "-o", "OUT"], "has no function 'missing'"),
    (["map", "tests.tasks:squar", "IN", "-o", "OUT"], "did you mean 'square'?"),
    (["map", "tests.tasks:Grid.nothing", "IN", "-o", "OUT"], "has no function 'Grid.nothing'"),
    (["map", "tests.tasks:Grid.writabl", "IN", "-o", "OUT"], "did you mean 'Grid.writable'?"),
    (["map", "tests.tasks:NOTHING", "IN", "-o", "OUT"], "not a function (its type is NoneType)"),
    (["map", "tests.tasks:count_to", "IN", "-o", "OUT"], "is a generator function"),
    (["map", "tests:tasks.square", "IN", "-o", "OUT"], "give it as tests.tasks:square"),
    (["map", "no_such_package.sub:fn", "IN", "-o", "OUT"], "put that folder on PYTHONPATH"),
    (["map", "tests.tasks:square", "IN", "-o", "SLASHED"], "the output names a folder"),
    # Each line was passed as self: every line failed.
    (["map", "tests.tasks:Scale.of_instances", "IN", "-o", "OUT"],
     "is a method of instances"),
    (["map", "tests.tasks:Scale.cached_of_instances", "IN", "-o", "OUT"],
     "is a method of instances"),
    (["map", "tests.tasks:STATE", "IN", "-o", "OUT"], "is not a function (its type is dict)"),
    (["map", "tests.tasks:async_square", "IN", "-o", "OUT"], "is an async function"),
    (["map", "tests.tasks", "IN", "-o", "OUT"], "expected MODULE:FUNCTION"),
    (["map", "tests.tasks:square", "MISSING", "-o", "OUT"], "no such input file"),
    (["map", "tests.tasks:square", "IN", "-o", "OUT", "--workers", "0"], "number of workers"),
    (["demo", "--workers", "two"], "not a whole number"),
    (["map", "tests.tasks:square", "IN", "-o", "IN"], "the output file is the input file"),
    (["map", "tests.tasks:square", "IN", "-o", "NOFOLDER"], "no such folder"),
    (["map", "tests.tasks:square", "IN", "-o", "UNDERFILE"], "in.jsonl is not a folder"),
    (["map", "broken_module:fn", "IN", "-o", "OUT"], "SyntaxError"),
    (["map", "tests.tasks:square", "IN", "-o", "NOTOUT", "--resume"],
     "is not the output of a map"),
    (["map", "tests.tasks:square", "IN", "-o", "FOLDER"], "the output is a folder"),
    (["map", "tests.tasks:square", "IN", "-o", ""], "no output file given"),
    (["map", "tests.tasks:square", "FOLDER", "-o", "OUT"], "the input is a folder"),
    (["map", "tests.tasks:square", "IN", "-o", "/dev/full", "--no-progress"],
     "cannot write /dev/full"),
    (["map", "exiting_module:fn", "IN", "-o", "OUT"], "SystemExit: a script"),
    (["demo", "--workers", "2000"], "number of workers (1 to 1,024)"),
    (["demo", "--limit", "-5"], "not a limit for the demo"),
    (["map", "tests/tasks.py:square", "IN", "-o", "OUT"], "tasks:square"),
    (["map", "tests.tasks:square", "IN", "-o", "-", "--resume"], "give a file, not -"),
    (["map", "tests.tasks:square", "IN", "-o", "-", "CLOSED"], "standard output: it is"),
    (["map", "tests.tasks:square", "/proc/self/mem", "-o", "OUT", "--no-progress"],
     "cannot read /proc/self/mem: Input/output error"),
])
def test_bad_command_lines_are_one_line_and_exit_code_2(args: list[str], message: str,
                                                       tmp_path: Path) -> None:
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("1\n")
    dst.write_text('{"line": 1, "result": 1}\n')  # an earlier run's output
    other = tmp_path / "notes.jsonl"
    other.write_text('"a line of some other file"\n')
    (tmp_path / "broken_module.py").write_text("def fn(:\n")
    (tmp_path / "exiting_module.py").write_text("import sys\nsys.exit('a script')\n")
    names = {"IN": src, "OUT": dst, "MISSING": tmp_path / "missing.jsonl",
             "NOFOLDER": tmp_path / "nowhere" / "out.jsonl", "NOTOUT": other,
             "FOLDER": tmp_path, "UNDERFILE": src / "out.jsonl",
             "SLASHED": f"{tmp_path / 'nowhere'}{os.sep}"}
    closed = "CLOSED" in args  # standard output closed (`>&-`): a traceback
    args = [str(names[a]) if a in names else a for a in args if a != "CLOSED"]
    out = _cli(*args, env={"PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}, closed=closed)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and len(out.stderr.strip().splitlines()) <= 2, out.stderr
    assert "Traceback" not in out.stderr
    assert dst.read_text() == '{"line": 1, "result": 1}\n'  # never truncated
    assert src.read_text() == "1\n" and other.read_text() == '"a line of some other file"\n'


@pytest.mark.parametrize(("spec", "expected"), [
    ("tests.tasks:Scale.triple", [3, 6]),
    # Refused as methods of instances: a function kept as a class attribute, and a
    # metaclass's method (bound to the class).
    ("tests.tasks:Scale.kept", [1, 4]),
    ("tests.tasks:Metered.named", ["Metered:1", "Metered:2"]),
])
def test_functions_found_on_a_class_are_functions_to_map(tmp_path: Path, spec: str,
                                                         expected: list[object]) -> None:
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("1\n2\n")
    out = _cli("map", spec, str(src), "-o", str(dst), "--no-progress")
    assert out.returncode == 0, out.stderr
    assert [json.loads(line)["result"] for line in dst.read_text().splitlines()] == expected


def test_a_result_too_deep_for_json_is_its_lines_error(tmp_path: Path) -> None:
    # Encoded in the worker, it was a bare RecursionError, with no word of JSON.
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("100000\n3\n")
    out = _cli("map", "tests.tasks:nested", str(src), "-o", str(dst), "--no-progress")
    assert out.returncode == 1, out.stderr
    records = [json.loads(line) for line in dst.read_text().splitlines()]
    assert records[0]["error"].startswith("RecursionError: the result is not JSON"), records
    assert records[1] == {"line": 2, "result": [[[[]]]]}


def test_nan_and_infinity_are_not_json(tmp_path: Path) -> None:
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('"nan"\n"inf"\n"1.5"\n')
    out = _cli("map", "builtins:float", str(src), "-o", str(dst), "--no-progress")
    assert out.returncode == 1, out.stderr
    records = [json.loads(line) for line in dst.read_text().splitlines()]  # strict JSON
    assert "not JSON" in records[0]["error"] and "not JSON" in records[1]["error"]
    assert records[2] == {"line": 3, "result": 1.5}
    assert "NaN" not in dst.read_text() and "Infinity" not in dst.read_text()


def test_errors_name_the_line_not_the_item(tmp_path: Path) -> None:
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("1\n\n2\n3\n")
    out = _cli("map", "tests.tasks:exit_on_two", str(src), "-o", str(dst), "--no-progress")
    records = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 3, 4], out.stderr
    assert records[1]["error"].startswith("WorkerCrashed: line 3"), records


def test_standard_input_and_a_pipe_are_read(tmp_path: Path) -> None:
    dst = tmp_path / "out.jsonl"
    out = subprocess.run([sys.executable, "-m", "asyncpool", "map", "tests.tasks:square",
                          "-", "-o", str(dst), "--no-progress"], cwd=ROOT, input="2\n3\n",
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert [json.loads(line)["result"] for line in dst.read_text().splitlines()] == [4, 9]


def test_resume_says_when_the_output_goes_past_the_input(tmp_path: Path) -> None:
    # It wrote nothing, exited 0 and said nothing: the output of another input.
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("1\n2\n")
    dst.write_text("".join(f'{{"line": {n}, "result": {n}}}\n' for n in range(1, 6)))
    out = _cli("map", "tests.tasks:square", str(src), "-o", str(dst), "--resume",
               "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "past the input's last line (2)" in out.stderr


def test_resume_adds_the_newline_a_whole_last_record_lost(tmp_path: Path) -> None:
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("1\n2\n3\n")
    dst.write_text('{"line": 1, "result": 1}\n{"line": 2, "result": 4}')
    out = _cli("map", "tests.tasks:square", str(src), "-o", str(dst), "--resume",
               "--no-progress")
    assert out.returncode == 0, out.stderr
    assert [json.loads(line) for line in dst.read_text().splitlines()] == [
        {"line": 1, "result": 1}, {"line": 2, "result": 4}, {"line": 3, "result": 9}]


def test_a_reader_that_goes_away_ends_the_demo_quietly() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "asyncpool", "demo", "--limit", "10000",
                             "--no-progress"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader left before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err, err


def test_map_writes_standard_output_and_stops_quietly_when_its_reader_goes(
        tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("1\n2\n3\n")
    out = _cli("map", "tests.tasks:square", str(src), "-o", "-", "--no-progress")
    assert out.returncode == 0, out.stderr
    assert [json.loads(line)["result"] for line in out.stdout.splitlines()] == [1, 4, 9]
    assert "to standard output" in out.stderr
    # The reader takes one line and leaves (`| head -1`): the write error said "cannot
    # write" and exited 2.
    src.write_text("7\n" * 200_000)
    proc = _map_to_stdout("tests.tasks:square", src)
    assert proc.stdout is not None and proc.stderr is not None
    assert json.loads(proc.stdout.readline())["result"] == 49
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "cannot write" not in err, err


def test_a_tasks_own_words_are_left_alone(tmp_path: Path) -> None:
    # Only the pool's own "item N" becomes "line N": an error of the task that said
    # "order item 42" was rewritten to "order line 1".
    out = _map_own_module(tmp_path, "class Odd(Exception):\n"
                                    "    def __init__(self, a, b):\n"
                                    "        super().__init__(f'order item {a} of batch {b}')\n"
                                    "def fn(x):\n"
                                    "    raise Odd(42, x)\n", "1\n")
    assert out.returncode == 1, out.stderr
    dst = tmp_path / "out.jsonl"
    assert "order item 42 of batch 1" in json.loads(dst.read_text())["error"]


def test_an_error_whose_message_cannot_be_shown_is_that_lines_error(tmp_path: Path) -> None:
    # str() of it raised in the command line itself: a traceback, and the lines after
    # it were never written.
    out = _map_own_module(tmp_path, "class Mute(Exception):\n"
                                    "    def __str__(self):\n"
                                    "        raise RuntimeError('no words')\n"
                                    "def fn(x):\n"
                                    "    if x == 2:\n"
                                    "        raise Mute()\n"
                                    "    return x\n", "1\n2\n3\n")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    dst = tmp_path / "out.jsonl"
    records = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r.get("result") for r in records] == [1, None, 3]
    assert records[1]["error"].startswith("Mute: ")


@pytest.mark.parametrize("stdout", ["-", "/dev/stdout"])
def test_what_the_function_prints_stays_out_of_records_on_standard_output(
        tmp_path: Path, stdout: str) -> None:
    # The workers wrote to the same standard output: "debug 2" lines among the records.
    # Then only workers were kept off it: the module, imported by the command line
    # itself, still printed there (as the function did on threads, or on the loop).
    out = _map_own_module(tmp_path, "print('loading')\n"
                                    "def fn(x):\n    print('debug', x)\n    return x\n",
                          "".join(f"{i}\n" for i in range(50)), output=stdout)
    assert out.returncode == 0, out.stderr
    assert [json.loads(line)["result"] for line in out.stdout.splitlines()] == list(range(50))
    assert out.stderr.count("debug") == 50  # two workers may interleave their lines
    assert "loading" in out.stderr


def test_options_go_before_or_after_the_subcommand(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("1\n2\n")
    for i, args in enumerate((["--workers", "1", "--no-progress", "map"],
                              ["map", "--workers", "1", "--no-progress"])):
        dst = tmp_path / f"out{i}.jsonl"
        out = _cli(*args, "tests.tasks:square", str(src), "-o", str(dst))
        assert out.returncode == 0, out.stderr
        assert [json.loads(line)["result"] for line in dst.read_text().splitlines()] == [1, 4]


def test_a_line_that_is_not_utf8_is_that_lines_error(tmp_path: Path) -> None:
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    # A file that starts with a byte order mark (as Notepad writes) lost its first
    # line; bad bytes inside a JSON string went through replaced, as a result.
    # A line of good UTF-8 that starts with U+FFFD is bad JSON, not bad UTF-8.
    src.write_bytes(b'\xef\xbb\xbf1\n\xff\xfe\n"\xff\xfe"\n' + "\ufffd2\n".encode())
    out = _cli("map", "tests.tasks:echo", str(src), "-o", str(dst), "--no-progress")
    assert out.returncode == 1, out.stderr
    records = [json.loads(line) for line in dst.read_text().splitlines()]
    assert records[0]["result"] == 1
    assert "line 2 is not UTF-8 text" in records[1]["error"]
    assert "line 3 is not UTF-8 text" in records[2]["error"]
    assert "line 4 is not valid JSON" in records[3]["error"]
    assert "3 error(s)" in out.stderr
    again = _cli("map", "tests.tasks:echo", str(src), "-o", str(dst), "--resume",
                 "--no-progress")  # nothing left to do, but the output still has an error
    assert again.returncode == 1 and "4 skipped" in again.stderr, again.stderr
    assert len(dst.read_text().splitlines()) == 4


def test_map_without_tqdm(tmp_path: Path, no_tqdm: dict[str, str]) -> None:
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(f"{i}\n" for i in range(100)))
    out = _cli("map", "tests.tasks:square", str(src), "-o", str(dst), env=no_tqdm)
    assert out.returncode == 0, out.stderr
    assert len(dst.read_text().splitlines()) == 100
    assert re.search(r"^[\d,]+ done$", out.stderr, re.MULTILINE), out.stderr


def _interruptible() -> None:
    """In the child: Ctrl-C as a terminal's finds it, even where this run ignores SIGINT
    (a job started in the background inherits that, and Python keeps it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _map_to_stdout(function: str, src: Path) -> subprocess.Popen[bytes]:
    """``map FUNCTION SRC -o -``, its output and errors piped here."""
    return subprocess.Popen([sys.executable, "-m", "asyncpool", "map", function, str(src),
                             "-o", "-", "--no-progress"], cwd=ROOT, preexec_fn=_interruptible,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _deaf() -> None:
    """In the child: SIGINT ignored, as in a job started in the background."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _kill_midway(src: Path, dst: Path, how: int,
                 preexec: Any = _interruptible) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "asyncpool", "map", "tests.tasks:slow_echo", str(src),
           "-o", str(dst), "--no-progress", "--workers", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, preexec_fn=preexec,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if dst.exists() and dst.read_text().count("\n") >= 40:
            break
        time.sleep(0.02)
    if how == signal.SIGKILL:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its workers, mid-run
    else:
        proc.send_signal(how)  # Ctrl-C
    proc.wait(timeout=30)
    return proc


@pytest.mark.slow
@pytest.mark.parametrize(("how", "preexec"), [
    (signal.SIGKILL, _interruptible), (signal.SIGINT, _interruptible),
    # SIGTERM (`docker stop`, `timeout`) ended it with no word (exit -15); where
    # SIGINT is ignored too, as in a background job.
    (signal.SIGTERM, _interruptible), (signal.SIGTERM, _deaf)])
def test_resume_after_a_killed_or_interrupted_run(tmp_path: Path, how: int,
                                                  preexec: Any) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(f"{i}\n" for i in range(300)))
    dst = tmp_path / "out.jsonl"
    proc = _kill_midway(src, dst, how, preexec)
    if how != signal.SIGKILL:
        assert proc.returncode == (130 if how == signal.SIGINT else 143)
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
        assert "--resume" in err and "Traceback" not in err and "leaked" not in err, err
        assert ("interrupted" if how == signal.SIGINT else "terminated") in err, err
    written = dst.read_text().count("\n")
    assert 40 <= written < 300
    out = _cli("map", "tests.tasks:slow_echo", str(src), "-o", str(dst), "--resume",
               "--no-progress")
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r["line"] for r in records] == list(range(1, 301))
    assert [r["result"] for r in records] == list(range(300))


def _peak_kb(*args: str) -> int:
    """The peak RSS (KB) of a ``map`` run with ``args`` in a fresh interpreter."""
    code = ("import resource, sys; from asyncpool.__main__ import main; "
            "rc = main(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    out = run_code(code, "map", *args, "--no-progress", timeout=300)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


def test_results_far_bigger_in_memory_than_pickled_are_held_as_text(tmp_path: Path) -> None:
    # A list of 20,000 ints pickles to a twelfth of what it holds in memory: the parent
    # held 32 MB of such pickles loaded while it wrote them (peak 330-400 MB).
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("20000\n" * 3000)
    peak_kb = _peak_kb("tests.tasks:ints", str(src), "-o", str(dst))
    assert peak_kb < 150 * 1024, f"peak RSS {peak_kb // 1024} MB"
    with dst.open() as f:
        lines = [json.loads(line) for line in itertools.islice(f, 2)]
        assert sum(1 for _ in f) == 2998
    assert lines[1] == {"line": 2, "result": list(range(20000))}


@pytest.mark.slow
def test_a_big_file_streams_in_flat_memory(tmp_path: Path) -> None:
    src, dst = tmp_path / "big.jsonl", tmp_path / "out.jsonl"
    line = json.dumps({"text": "x" * 70}) + "\n"  # 83 bytes: an 83 MB file
    with src.open("w") as f:
        for _ in range(1_000_000):
            f.write(line)
    assert src.stat().st_size > 75_000_000
    peak_kb = _peak_kb("tests.tasks:echo", str(src), "-o", str(dst))
    assert peak_kb < 200 * 1024, f"peak RSS {peak_kb // 1024} MB"  # was 500-580 MB
    with dst.open() as f:
        count = sum(1 for _ in f)
    assert count == 1_000_000
    # Resuming reads the output a line at a time too (it read it whole: 240 MB).
    with dst.open("rb+") as f:
        f.truncate(dst.stat().st_size * 3 // 4)
    peak_kb = _peak_kb("tests.tasks:echo", str(src), "-o", str(dst), "--resume")
    assert peak_kb < 120 * 1024, f"peak RSS {peak_kb // 1024} MB with --resume"
    with dst.open() as f:
        assert sum(1 for _ in f) == 1_000_000


@pytest.mark.slow
def test_an_interrupted_run_says_resume_only_where_it_can(tmp_path: Path) -> None:
    # Interrupted while writing to standard output, it said "run again with --resume",
    # which refuses standard output.
    src = tmp_path / "in.jsonl"
    src.write_text("".join(f"{i}\n" for i in range(300)))
    proc = _map_to_stdout("tests.tasks:slow_echo", src)
    assert proc.stdout is not None and proc.stderr is not None
    assert json.loads(proc.stdout.readline())["line"] == 1
    proc.send_signal(signal.SIGINT)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=30) == 130
    assert "interrupted" in err and "--resume" not in err and "Traceback" not in err, err
    # Nor where no output was written yet (the first item takes 30 s), be there no
    # output file or one another run left (resumed, it would keep that run's lines).
    src.write_text("30\n")
    dst = tmp_path / "out.jsonl"
    for before in (None, '{"line": 1, "result": "another run"}\n'):
        if before is not None:
            dst.write_text(before)
        proc = subprocess.Popen([sys.executable, "-m", "asyncpool", "map",
                                 "tests.tasks:nap", str(src), "-o", str(dst),
                                 "--no-progress"], cwd=ROOT, preexec_fn=_interruptible,
                                stderr=subprocess.PIPE)
        # Its workers run: it handles Ctrl-C by then (any moment before the first
        # result does).
        cli = psutil.Process(proc.pid)
        assert settle(lambda cli=cli: len(cli.children(recursive=True)) >= 2, timeout=30)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
        assert (dst.read_text() if dst.exists() else None) == before
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
        if before is None:
            assert "interrupted" in err and "--resume" not in err, err
        else:  # and says so: resumed, it would keep that run's lines
            assert "interrupted before the first result" in err, err
            assert "left as it was: run again without --resume" in err, err


def test_a_generator_from_behind_a_wrapper_fails_each_line_saying_so(tmp_path: Path) -> None:
    # Each line failed as "the result is not JSON (Object of type generator ...)".
    source = ("import functools\n\ndef count(n):\n    yield from range(n)\n\n"
              "fn = functools.wraps(count)(lambda n: count(n))\n")
    out = _map_own_module(tmp_path, source, "1\n2\n")
    assert out.returncode == 1, out.stderr
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [line["line"] for line in lines] == [1, 2]
    assert all("returned a generator" in line["error"] for line in lines), lines
