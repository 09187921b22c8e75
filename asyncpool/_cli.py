"""The batch ``map`` command: a JSONL file through the pool, resumable.

Kept out of ``__main__`` so that worker processes can import what they unpickle.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from ._pool import ResilientPool


def _load(spec: str) -> Callable[[Any], Any]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not attr:
        raise SystemExit(f"expected MODULE:FUNCTION, got {spec!r}")
    sys.path.insert(0, os.getcwd())
    fn = getattr(importlib.import_module(module_name), attr)
    if not callable(fn):
        raise SystemExit(f"{spec} is not callable")
    return fn  # type: ignore[no-any-return]


def _done_lines(path: str) -> set[int]:
    """Line numbers already in OUTPUT; a torn last line (a killed run) is cut off."""
    done: set[int] = set()
    if not os.path.exists(path):
        return done
    with open(path, "rb+") as f:
        good = 0
        for raw in f:
            try:
                done.add(int(json.loads(raw)["line"]))
            except (ValueError, KeyError, TypeError):
                break
            good += len(raw)
        f.truncate(good)
    return done


class _BadLine(Exception):
    pass


def _inputs(path: str, skip: set[int]) -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if number in skip or not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                yield number, _BadLine(f"line {number} is not valid JSON ({exc}); fix or "
                                       "remove it and run again with --resume")


class _Apply:
    """Picklable wrapper: (line, value) -> (line, result); bad lines pass through."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn

    def __call__(self, pair: tuple[int, Any]) -> tuple[int, Any]:
        number, value = pair
        if isinstance(value, _BadLine):
            raise value
        return number, self.fn(value)


async def map_file(args: argparse.Namespace) -> tuple[int, int, int]:
    """Returns (lines written, of which failed, lines skipped as already done)."""
    fn = _load(args.function)
    skip = _done_lines(args.output) if args.resume else set()
    pending = list(_inputs(args.input, skip))
    failed = 0
    mode = "a" if args.resume else "w"
    async with ResilientPool(max_workers=args.workers) as pool:
        with open(args.output, mode, encoding="utf-8") as out:
            results = pool.imap(_Apply(fn), pending, return_exceptions=True,
                                progress=not args.no_progress)
            index = 0
            async for result in results:
                number = pending[index][0]
                index += 1
                if isinstance(result, BaseException):
                    failed += 1
                    record = {"line": number, "error": f"{type(result).__name__}: {result}"}
                else:
                    record = {"line": number, "result": result[1]}
                out.write(json.dumps(record) + "\n")
                out.flush()
    return len(pending), failed, len(skip)
