"""``python -m asyncpool``: the demo, and a resumable batch ``map`` over JSON lines."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from ._cli import map_file
from ._demo import run_demo


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
    written, failed, skipped = asyncio.run(map_file(args))
    print(f"wrote {written} line(s) to {args.output} ({failed} error(s), {skipped} skipped "
          "as already done)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
