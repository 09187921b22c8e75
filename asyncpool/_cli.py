"""The batch ``map`` command: a JSONL file through the pool, streamed and resumable.

Kept out of ``__main__`` so that worker processes can import what they unpickle.
Lines travel to the workers as text and are parsed there; the input is read only as
fast as the workers take it, so memory stays flat however big the file.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator
from typing import IO, Any

from ._pool import ResilientPool


class UsageError(Exception):
    """A mistake in the command line or its files: one line on stderr, exit code 2."""


def load_function(spec: str) -> Callable[[Any], Any]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"expected MODULE:FUNCTION, got {spec!r}")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # not found, a syntax error, or raising as it loads
        raise UsageError(f"cannot import {module_name!r}: "
                         f"{type(exc).__name__}: {exc}") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise UsageError(f"{module_name} has no function {attr!r}")
    return fn  # type: ignore[no-any-return]


def done_lines(path: str) -> tuple[set[int], int]:
    """Line numbers already in OUTPUT, and how many of them hold an error. A torn last
    line (a killed run) is cut off; a file that is not map output is left alone."""
    done: set[int] = set()
    errors = 0
    if not os.path.exists(path):
        return done, errors
    with open(path, "rb+") as f:
        lines = f.readlines()
        good = 0
        for number, raw in enumerate(lines, 1):
            try:
                record = json.loads(raw)
                done.add(int(record["line"]))
                errors += "error" in record
            except (ValueError, KeyError, TypeError):
                if number < len(lines) or raw.endswith(b"\n"):
                    raise UsageError(f"{path} is not the output of a map (line {number}); "
                                     "--resume continues a map's own output") from None
                break  # the torn last line of a killed run
            good += len(raw)
        f.truncate(good)
    return done, errors


class Apply:
    """Runs in the workers: (line number, text) -> the function's result on its JSON."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn

    def __call__(self, line: tuple[int, str]) -> Any:
        number, text = line
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            what = "UTF-8 text" if "\ufffd" in text else f"valid JSON ({exc})"
            raise ValueError(f"line {number} is not {what}; fix it and run the map "
                             "again without --resume (which keeps this error as "
                             "done)") from None
        return self.fn(value)


class Counts:
    """What a run did: lines written, lines in the output with an error (earlier ones
    kept by --resume included), lines skipped as done, blank lines."""

    def __init__(self) -> None:
        self.written = self.failed = self.skipped = self.blank = 0


def read_lines(path: str, skip: set[int], numbers: deque[int],
               counts: Counts) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line to do, noting the numbers in order. A line that
    is not UTF-8 goes through with its bad bytes replaced: it is that line's error."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            text = raw.decode("utf-8", errors="replace")
            if number in skip:
                counts.skipped += 1
            elif not text.strip():
                counts.blank += 1
            else:
                numbers.append(number)
                yield number, text


def record(number: int, result: Any) -> tuple[str, bool]:
    """One output line, and whether it holds an error (the item's, or a result that
    is not JSON)."""
    if isinstance(result, BaseException):
        text = f"{type(result).__name__}: {result}"
        return json.dumps({"line": number, "error": text}), True
    try:
        return json.dumps({"line": number, "result": result}), False
    except (TypeError, ValueError) as exc:
        text = f"the result is not JSON ({exc})"
        return json.dumps({"line": number, "error": text}), True


async def map_file(args: argparse.Namespace) -> Counts:
    """Map ARGS.function over ARGS.input into ARGS.output; returns what it did."""
    fn = load_function(args.function)
    if not os.path.isfile(args.input):
        raise UsageError(f"no such input file: {args.input}")
    if os.path.exists(args.output) and os.path.samefile(args.input, args.output):
        raise UsageError("the output file is the input file; write to another file")
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        raise UsageError(f"no such folder for the output: {folder}")
    counts = Counts()
    skip: set[int] = set()
    if args.resume:
        skip, counts.failed = done_lines(args.output)
    numbers: deque[int] = deque()
    out: IO[str] | None = None
    try:
        async with ResilientPool(max_workers=args.workers) as pool:
            lines = read_lines(args.input, skip, numbers, counts)
            async with pool.imap(Apply(fn), lines, return_exceptions=True,
                                 progress=not args.no_progress) as results:
                async for result in results:
                    if out is None:
                        # Opened at the first result: a run that fails to start
                        # leaves the output as it was.
                        out = open(args.output, "a" if args.resume else "w",
                                   encoding="utf-8")
                    line, failed = record(numbers.popleft(), result)
                    counts.failed += failed
                    out.write(line + "\n")
                    out.flush()
                    counts.written += 1
    finally:
        if out is not None:
            out.close()
    if out is None and not args.resume:
        open(args.output, "w").close()  # nothing to do: an empty output
    return counts
