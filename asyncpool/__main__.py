"""``python -m asyncpool``: the demo, and a resumable batch ``map`` over JSON lines."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any, NoReturn

EPILOG = """exit codes: 0 every line done, 1 some lines failed (their errors are in the
output; a line that is not JSON is one of them), 2 a usage, input or output error,
130 interrupted (Ctrl-C) and 143 terminated (SIGTERM): run again with --resume,
141 the reader of standard output went away."""
DEMO_EPILOG = """exit codes: 0 done, 2 a usage error, 130 interrupted (Ctrl-C), 143 terminated
(SIGTERM)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not the usage block: the mistake and where help is.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _table(rows: dict[str, Any]) -> str:
    width = max(len(k) for k in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows.items())


def _number(low: int, high: int, what: str) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not {what} ({low} to {high:,})")
        return value
    return parse


def _demo(args: argparse.Namespace) -> int:
    import asyncio

    from ._cli import progress_for
    from ._demo import run_demo

    outcome = asyncio.run(run_demo(limit=args.limit,
                                   progress=progress_for(not args.no_progress),
                                   max_workers=args.workers))
    print(f"asyncpool demo: {outcome['primes']} primes below {outcome['limit']:,} "
          f"({outcome['blocks']} blocks) in {outcome['seconds']:.2f} s")
    print(f"served by the {outcome['rung']!r} rung")
    print("statistics:")
    print(_table(outcome["statistics"]))
    return 0


def _map(args: argparse.Namespace) -> int:
    import asyncio

    from ._cli import map_file

    counts = asyncio.run(map_file(args))
    extra = f", {counts.blank} blank line(s) skipped" if counts.blank else ""
    if counts.done > counts.lines:
        print(f"warning: {args.output} holds results up to line {counts.done}, past the "
              f"input's last line ({counts.lines}): is it the output of this input?",
              file=sys.stderr)
    where = "standard output" if args.output == "-" else args.output
    print(f"wrote {counts.written:,} line(s) to {where} ({counts.failed:,} error(s) in "
          f"it, {counts.skipped:,} skipped as already done{extra})", file=sys.stderr)
    return 1 if counts.failed else 0


def _common(defaults: bool) -> _Parser:
    """The options every command takes, before or after its name. After it, they have
    no defaults of their own, so they do not undo what was given before it."""
    from ._config import MAX_WORKERS

    common = _Parser(add_help=False)

    def unset(default: object) -> object:
        return default if defaults else argparse.SUPPRESS

    common.add_argument("-v", "--verbose", action="store_true", default=unset(False),
                        help="log the pool's INFO events too (climbing back, failed "
                             "starts, retries); warnings show without it")
    common.add_argument("--workers", type=_number(1, MAX_WORKERS, "a number of workers"),
                        default=unset(None),
                        help="worker processes (default: the usable cores)")
    common.add_argument("--no-progress", action="store_true", default=unset(False),
                        help="show no progress on stderr (by default a tqdm bar, or "
                             "without tqdm a count every few seconds)")
    return common


def parser() -> argparse.ArgumentParser:
    # Run as the `asyncpool` script or as `python -m asyncpool`: say which.
    prog = "asyncpool" if os.path.basename(sys.argv[0]) == "asyncpool" else (
        "python -m asyncpool")
    common = _common(defaults=False)
    main = _Parser(prog=prog, parents=[_common(defaults=True)],
                   description="CPU-bound work in a resilient pool.", epilog=EPILOG)
    main.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = main.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", parents=[common], epilog=DEMO_EPILOG,
                          help="count primes on built-in data; show rung and statistics")
    demo.add_argument("--limit", type=_number(1, 10**9, "a limit for the demo"),
                      default=2_000_000,
                      help="count primes below this (default: %(default)s)")
    mapper = sub.add_parser("map", parents=[common], epilog=EPILOG,
                            help="run MODULE:FUNCTION over each line of a JSONL file")
    mapper.add_argument("function", help="MODULE:FUNCTION (or MODULE:Class.method, a "
                        "static or class method), importable from here")
    mapper.add_argument("input", help="input file, one JSON value per line (blank lines "
                                      "are skipped); - reads standard input")
    mapper.add_argument("-o", "--output", required=True,
                        help='output JSONL file: {"line": N, "result": ...} or '
                             '{"line": N, "error": "..."} per input line, in order; - '
                             "writes standard output (what the function prints then "
                             "goes to standard error)")
    mapper.add_argument("--resume", action="store_true",
                        help="skip lines already in OUTPUT (after a killed run of the "
                             "same input and function: that is not checked)")
    return main


def _version() -> str:
    from . import __version__

    return __version__


def hold_standard_descriptors() -> None:
    """Open /dev/null on a closed standard descriptor (0, 1 or 2), so that no file the
    run opens takes its number (the event loop's, where output went). Messages for a
    closed standard error go there (with none, print() wrote them to the output)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one
    if sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False)


def _interrupt() -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    # Everything that takes a while (imports too) runs inside: Ctrl-C at any time
    # after start is one line, not a traceback.
    resumable: list[str] = []
    untouched: list[str] = []  # a map's output another run left, not yet opened
    terminated: list[bool] = []

    def on_sigterm(signum: int, frame: Any) -> None:
        # As Ctrl-C stops it (`docker stop`, `timeout` and service managers send
        # SIGTERM): through asyncio's own handler when it runs, else at once. A second
        # one ends it now (the fork server then stops every worker).
        if terminated:
            os._exit(143)
        terminated.append(True)
        interrupt = signal.getsignal(signal.SIGINT)
        if callable(interrupt) and interrupt is not signal.default_int_handler:
            interrupt(signal.SIGINT, frame)
            return
        # Between two of the loop's callbacks, not inside one of the pool's (raised
        # there, in a run where SIGINT is ignored, it once left the run hanging).
        asyncio = sys.modules.get("asyncio")  # imported once a loop runs
        try:
            loop = asyncio.get_running_loop() if asyncio is not None else None
        except RuntimeError:
            loop = None
        if loop is None:
            raise KeyboardInterrupt
        loop.call_soon_threadsafe(_interrupt)

    try:
        signal.signal(signal.SIGTERM, on_sigterm)
        hold_standard_descriptors()
        return _main(argv, resumable, untouched)
    except BrokenPipeError:
        # The reader of our output left (`| head`): stop quietly, as tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        if resumable and os.path.exists(resumable[0]):
            said = "; what was written is kept: run again with --resume"
        elif untouched:  # resumed, another run's lines would pass for this one's
            said = (f" before the first result; {untouched[0]} is left as it was: run "
                    "again without --resume")
        else:
            said = ""
        print(("terminated" if terminated else "interrupted") + said, file=sys.stderr)
        if terminated:  # stopping already: a later SIGTERM must not end it by signal
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return 143 if terminated else 130


def _main(argv: list[str] | None, resumable: list[str], untouched: list[str]) -> int:
    """Run the command line; ``resumable`` gets the output file of a map once this run
    wrote to it, or kept it (--resume): an interrupted run can then be continued;
    ``untouched`` the output of another run that a new map has not yet opened."""
    import logging

    command = parser()
    args = command.parse_args(argv)
    if getattr(args, "output", None) in ("/dev/stdout", "/dev/fd/1", "/proc/self/fd/1"):
        args.output = "-"  # standard output by another name: records alone on it
    if args.command == "map" and args.output not in (None, "-"):
        args.resumable = resumable  # the map adds its output when it opens it
        if args.resume:
            resumable.append(args.output)
        elif os.path.exists(args.output):
            untouched.append(args.output)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from ._cli import UsageError

    try:
        return _demo(args) if args.command == "demo" else _map(args)
    except UsageError as exc:
        print(f"{command.prog}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
