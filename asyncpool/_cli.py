"""The batch ``map`` command: a JSONL file through the pool, streamed and resumable.

Kept out of ``__main__`` so that worker processes can import what they unpickle.
Lines travel to the workers as text and are parsed there; the input is read only as
fast as the workers take it, so memory stays flat however big the file.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import inspect
import json
import os
import re
import stat
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import IO, Any, NoReturn

from ._errors import AsyncPoolError
from ._execute import plain
from ._functions import check_function
from ._pool import ResilientPool
from ._remote import message_of

#: How the pool's own errors name an item (at the start of their message).
_ITEM = re.compile(r"^item \d+\b")


class UsageError(Exception):
    """A mistake in the command line or its files: one line on stderr, exit code 2."""


_ABSENT = object()
#: What a JSON line's value may be: a method of these takes the value as its self.
_JSON_TYPES = (dict, list, str, int, float, bool, type(None))


def load_function(spec: str) -> Callable[[Any], Any]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"expected MODULE:FUNCTION, got {spec!r}")
    if module_name.endswith(".py") or os.sep in module_name:
        name = os.path.splitext(os.path.basename(module_name))[0]
        raise UsageError(f"give a module name, not a file: {name}:{attr} (from the "
                         "file's folder, or with the folder on PYTHONPATH)")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:  # not found, a syntax error, raising or
        # exiting as it loads (a script that parses its command line, say)
        hint = (" (run from the module's folder, or put that folder on PYTHONPATH)"
                if isinstance(exc, ModuleNotFoundError)
                and exc.name == module_name.partition(".")[0] else "")
        raise UsageError(f"cannot import {module_name!r}: "
                         f"{type(exc).__name__}: {exc}{hint}") from None
    fn: Any = module
    owner: Any = None
    parts = attr.split(".")  # MODULE:Class.method too
    for at, part in enumerate(parts):
        owner, fn = fn, getattr(fn, part, _ABSENT)
        if fn is _ABSENT:
            near = difflib.get_close_matches(part, [n for n in dir(owner)
                                                    if not n.startswith("_")], 1)
            sub = (f"{owner.__name__}.{part}" if hasattr(owner, "__path__")
                   and at + 1 < len(parts) and importlib.util.find_spec(
                       f"{owner.__name__}.{part}") is not None else "")  # (a package's)
            raise UsageError(f"{module_name} has no function {attr!r}" + (
                f": did you mean {'.'.join([*parts[:at], near[0]])!r}?" if near else
                f" (a submodule: give it as {sub}:{'.'.join(parts[at + 1:])})" if sub
                else ""))
    if _of_instances(owner, fn, inspect.getattr_static(owner, attr.rpartition(".")[2], None)):
        raise UsageError(f"{module_name}.{attr} is a method of instances: each line would "
                         "be passed as self; make it a staticmethod or classmethod, or "
                         "give a function")
    if not callable(fn):
        raise UsageError(f"{module_name}.{attr} is not a function (its type is "
                         f"{type(fn).__name__})")
    try:
        check_function(fn)  # not async, not a generator function
    except TypeError as exc:
        raise UsageError(f"{module_name}.{attr}: {exc}") from None
    return fn  # type: ignore[no-any-return]


def _of_instances(owner: Any, fn: Any, static: Any) -> bool:
    """Whether ``fn``, found on ``owner``, is a method its instances are bound to: each
    line would be passed as its self."""
    if not isinstance(owner, type) or inspect.ismethod(fn):
        return False  # a module's function, or bound already (to the class)
    if isinstance(static, staticmethod | classmethod | type) or not hasattr(
            type(static), "__get__"):
        return False
    if any(issubclass(json_type, owner) for json_type in _JSON_TYPES):
        return False  # str.upper: each line is a str, its self
    qualname = getattr(fn, "__qualname__", None)
    if isinstance(qualname, str) and (inspect.isfunction(fn) or hasattr(fn, "__wrapped__")):
        # Defined in a class body (cached or not), not a module's function kept there.
        body = qualname.rpartition(".")[0]
        return bool(body) and not body.endswith("<locals>")
    return True  # a method of a built-in class


def done_lines(path: str) -> tuple[int, int]:
    """The last line number already in OUTPUT (its records run in input order, so
    every line up to it is done), and how many records hold an error; read a line at
    a time. A torn last line (a killed run) is cut off, a missing final newline
    added; a file that is not map output is left alone."""
    last = errors = 0
    try:
        f = open(path, "rb+")
    except FileNotFoundError:
        return last, errors
    with f:
        good = 0
        raw = b""
        for number, raw in enumerate(f, 1):
            try:
                record = json.loads(raw)
                line = int(record["line"])
                errors += "error" in record
                if line <= last:
                    raise ValueError("out of order")
                last = line
            except (ValueError, KeyError, TypeError):
                if raw.endswith(b"\n") or f.read(1):
                    raise UsageError(f"{path} is not the output of a map (line {number}); "
                                     "--resume continues a map's own output") from None
                raw = b"\n"  # the torn last line of a killed run
                break
            good += len(raw)
        f.seek(good)
        f.truncate()
        if good and not raw.endswith(b"\n"):
            f.write(b"\n")  # the last record was whole, its newline lost
    return last, errors


def _not_json(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON value")


class Apply:
    """Runs in the workers: (line number, text) -> the JSON of the function's result on
    its JSON (encoded there: the parent only writes it, and holds text as small as it
    came, not the objects it stands for)."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn

    def __call__(self, line: tuple[int, str | bytes]) -> Any:
        number, text = line
        if isinstance(text, bytes):
            self._bad(number, "UTF-8 text")
        try:
            value = json.loads(text, parse_constant=_not_json)
        except ValueError as exc:  # (a JSONDecodeError, or NaN or Infinity)
            self._bad(number, f"valid JSON ({exc})")
        result = self.fn(value)
        plain(result)  # (a generator from behind a wrapper: said so, not "not JSON")
        try:
            return json.dumps(result, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:  # (NaN is not JSON)
            raise type(exc)(f"the result is not JSON ({exc})") from None

    @staticmethod
    def _bad(number: int, what: str) -> NoReturn:
        raise ValueError(f"line {number} is not {what}; fix it and run the map again "
                         "without --resume (which keeps this error as done)") from None


class Counts:
    """What a run did: lines written, lines in the output with an error (earlier ones
    kept by --resume included), lines skipped as done, blank lines."""

    def __init__(self) -> None:
        self.written = self.failed = self.skipped = self.blank = 0
        #: Lines in the input, and the last line the output held before (--resume).
        self.lines = self.done = 0


def read_lines(path: str, done: int, numbers: deque[int],
               counts: Counts) -> Iterator[tuple[int, str | bytes]]:
    """(line number, text) of each line after line ``done``, noting the numbers in
    order ("-" reads standard input). A line that is not UTF-8 goes through as its
    bytes: it is that line's error. A byte order mark is skipped."""
    try:
        yield from _numbered(path, done, numbers, counts)
    except OSError as exc:  # a disk error, no descriptor left...
        where = "standard input" if path == "-" else path
        raise UsageError(f"cannot read {where}: {exc.strerror or exc}") from None


def _numbered(path: str, done: int, numbers: deque[int],
              counts: Counts) -> Iterator[tuple[int, str | bytes]]:
    with (open(sys.stdin.fileno(), "rb", closefd=False) if path == "-"
          else open(path, "rb")) as f:
        for number, raw in enumerate(f, 1):
            counts.lines = number
            text: str | bytes
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                text = raw
            if not text.strip():
                counts.blank += 1
            elif number <= done:
                counts.skipped += 1
            else:
                numbers.append(number)
                yield number, text


def progress_for(wanted: bool) -> bool | Callable[[int, int | None], None]:
    """A tqdm bar if tqdm is installed, else a line on standard error every few
    seconds (the pool's own stand-in is a log line at INFO, which a run without -v
    does not show)."""
    if not wanted:
        return False
    try:
        import tqdm.auto  # noqa: F401
    except ImportError:
        last = [0.0]

        def count(done: int, total: int | None) -> None:
            now = time.monotonic()
            if now - last[0] >= 2.0 or done == total:
                last[0] = now
                sys.stderr.write(f"{done:,}{f' of {total:,}' if total else ''} done\n")
        return count
    return True


def record(number: int, result: str | BaseException) -> tuple[str, bool]:
    """One output line, and whether it holds an error; ``result`` is the JSON of a
    line's result (see :class:`Apply`), or its error."""
    if isinstance(result, BaseException):
        message = message_of(result)
        if message is None:
            message = f"<its message could not be shown: {type(result).__name__}.__str__ raised>"
        if isinstance(result, AsyncPoolError):
            # The pool names an item by its index among the lines sent: say the line
            # (and leave the task's own words alone).
            message = _ITEM.sub(f"line {number}", message, count=1)
        text = f"{type(result).__name__}: {message}"
        return json.dumps({"line": number, "error": text}), True
    return f'{{"line": {number}, "result": {result}}}', False


def check_files(args: argparse.Namespace) -> None:
    """Before any work: the input can be read and the output written."""
    if args.input == "-" and sys.stdin is None:
        raise UsageError("cannot read standard input: it is closed")
    if args.input != "-":
        if not os.path.exists(args.input):
            raise UsageError(f"no such input file: {args.input}")
        if os.path.isdir(args.input):
            raise UsageError(f"the input is a folder: {args.input}")
    if not args.output:
        raise UsageError("no output file given (-o FILE)")
    if args.output == "-":
        if args.resume:
            raise UsageError("--resume reads the output: give a file, not -")
        if sys.stdout is None:
            raise UsageError("cannot write standard output: it is closed")
        return
    if os.path.isdir(args.output):
        raise UsageError(f"the output is a folder: {args.output}; give a file in it")
    if args.output.endswith(os.sep):
        raise UsageError(f"the output names a folder: {args.output}; give a file name")
    if os.path.exists(args.output):
        if args.input != "-" and os.path.samefile(args.input, args.output):
            raise UsageError("the output file is the input file; write to another file")
        if stat.S_ISREG(os.stat(args.output).st_mode):
            try:  # readable (--resume reads it) and writable: nothing is changed
                open(args.output, "rb+" if args.resume else "ab").close()
            except OSError as exc:
                raise UsageError(f"cannot {'read and ' if args.resume else ''}write "
                                 f"{args.output}: {exc.strerror}") from None
        return
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        raise UsageError(f"{folder} is not a folder: the output cannot go there" if
                         os.path.exists(folder) else f"no such folder for the output: {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write in the output's folder: {folder}")


async def map_file(args: argparse.Namespace) -> Counts:
    """Map ARGS.function over ARGS.input into ARGS.output; returns what it did."""
    if args.output != "-":
        return await _map_file(args, None)
    # Records alone on standard output: whatever else writes there (the function's
    # module as it is imported, the function on threads or on the loop, worker
    # processes and what they start) writes to standard error meanwhile.
    check_files(args)  # standard output may be closed
    sys.stdout.flush()
    records = os.dup(1)
    os.dup2(2, 1)
    try:
        return await _map_file(args, records)
    finally:
        sys.stdout.flush()
        os.dup2(records, 1)
        os.close(records)


async def _map_file(args: argparse.Namespace, records: int | None) -> Counts:
    fn = load_function(args.function)
    check_files(args)
    counts = Counts()
    done = 0
    if args.resume:
        done, counts.failed = done_lines(args.output)
        counts.done = done
    numbers: deque[int] = deque()
    out: IO[str] | None = None
    try:
        async with ResilientPool(max_workers=args.workers) as pool:
            lines = read_lines(args.input, done, numbers, counts)
            async with pool.imap(Apply(fn), lines, return_exceptions=True,
                                 progress=progress_for(not args.no_progress)) as results:
                async for result in results:
                    line, failed = record(numbers.popleft(), result)
                    try:
                        if out is None:
                            # Opened at the first result: a run that fails to start
                            # leaves the output as it was.
                            out = open(args.output if records is None else records,
                                       "a" if args.resume else "w", encoding="utf-8",
                                       closefd=records is None)
                            if not args.resume and hasattr(args, "resumable"):
                                args.resumable.append(args.output)
                        out.write(line + "\n")
                        out.flush()
                    except BrokenPipeError:
                        raise  # the reader of standard output left: exit 141
                    except OSError as exc:
                        where = "standard output" if args.output == "-" else args.output
                        raise UsageError(f"cannot write {where}: "
                                         f"{exc.strerror or exc}") from None
                    counts.failed += failed
                    counts.written += 1
    finally:
        if out is not None:
            try:
                out.close()
            except OSError:
                pass
    if out is None and not args.resume and args.output != "-":
        open(args.output, "w").close()  # nothing to do: an empty output
    return counts

