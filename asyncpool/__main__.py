"""``python -m asyncpool``: the demo, and a resumable batch ``map`` over JSON lines."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from ._demo import run_demo
from ._pool import ResilientPool


def _table(rows: dict[str, Any]) -> str:
    width = max(len(k) for k in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows.items())


def _demo(args: argparse.Namespace) -> int:
    outcome = asyncio.run(run_demo(limit=args.limit, progress=not args.no_progress,
                                   max_workers=args.workers))
    print(f"asyncpool demo: {outcome['primes']} primes below {outcome['limit']:,} "
          f"({outcome['blocks']} blocks) in {outcome['seconds']:.2f} s")
    print(f"served by the {outcome['rung']!r} rung")
    print("statistics:")
    print(_table(outcome["statistics"]))
    return 0


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


async def _map_file(args: argparse.Namespace) -> int:
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
    print(f"wrote {len(pending)} line(s) to {args.output} ({failed} error(s), "
          f"{len(skip)} skipped as already done)", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asyncpool",
                                     description="CPU-bound work in a resilient pool.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log pool events")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="count primes on built-in data; show rung and stats")
    demo.add_argument("--limit", type=int, default=2_000_000, help="count primes below this")
    demo.add_argument("--workers", type=int, default=None)
    demo.add_argument("--no-progress", action="store_true")
    mapper = sub.add_parser("map", help="run MODULE:FUNCTION over each line of a JSONL file")
    mapper.add_argument("function", help="MODULE:FUNCTION, importable from here")
    mapper.add_argument("input", help="input file, one JSON value per line")
    mapper.add_argument("-o", "--output", required=True, help="output JSONL file")
    mapper.add_argument("--resume", action="store_true",
                        help="skip lines already in OUTPUT (after a killed run)")
    mapper.add_argument("--workers", type=int, default=None)
    mapper.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        return _demo(args)
    return asyncio.run(_map_file(args))


if __name__ == "__main__":
    sys.exit(main())
