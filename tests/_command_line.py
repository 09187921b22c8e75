"""A main script run with interpreter options and arguments (``-O -W
error::DeprecationWarning _command_line.py --config prod.toml``): prints what an
initializer that parses the command line, and the tasks, saw on each rung."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from asyncpool import ResilientPool  # noqa: E402
from tests import tasks  # noqa: E402

CONFIG: str | None = None


def load_config() -> None:
    global CONFIG
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="dev.toml")
    CONFIG = parser.parse_args().config


def seen(_: int) -> dict[str, object]:
    return {"config": CONFIG, "argv": sys.argv[1:], "optimize": sys.flags.optimize,
            "warnoptions": sys.warnoptions, "asserts": tasks.asserts_run(),
            "warning": tasks.deprecation_raises()}


async def main() -> None:
    out = {}
    for rung in ("process", "thread", "inline"):
        async with ResilientPool(max_workers=1, rungs=(rung,), initializer=load_config) as pool:
            out[rung] = await pool.run(seen, 0)
    out["here"] = seen(0)
    print(json.dumps(out))


if __name__ == "__main__":
    load_config()
    asyncio.run(main())
