from __future__ import annotations

import dataclasses

import pytest

import asyncpool
from asyncpool import PoolConfig, ResilientPool

BAD = [
    ("max_workers", 0),
    ("max_workers", -1),
    ("max_workers", 1.5),
    ("chunk_size", 0),
    ("creation_attempts", 0),
    ("backoff_initial", -0.1),
    ("backoff_factor", 0.5),
    ("backoff_max", -1),
    ("backoff_jitter", 2),
    ("promote_after", -1),
    ("max_chunks_in_flight", 0),
    ("task_retries", -1),
    ("target_chunk_seconds", 0),
    ("rate_limit", 0),
    ("rungs", ("process", "gpu")),
    ("rungs", ()),
    ("rungs", ("inline", "process")),
    ("rungs", ("thread", "thread")),
]


@pytest.mark.parametrize(("field", "value"), BAD)
def test_invalid_setting_names_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"PoolConfig\.{field}=") as info:
        PoolConfig(**{field: value})  # type: ignore[arg-type]
    assert "must" in str(info.value) or "selection" in str(info.value)
    with pytest.raises(ValueError, match=field):
        ResilientPool(**{field: value})


def test_both_ways_to_configure() -> None:
    a = ResilientPool(max_workers=2, chunk_size=10)
    b = ResilientPool(config=PoolConfig(max_workers=2, chunk_size=10))
    assert a.config == b.config
    c = ResilientPool(3, config=PoolConfig(chunk_size=10))
    assert c.config.max_workers == 3 and c.config.chunk_size == 10
    with pytest.raises(ValueError, match="unknown option"):
        ResilientPool(max_wrokers=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.config.max_workers = 5  # type: ignore[misc]


def test_single_rung_name_is_accepted() -> None:
    assert PoolConfig(rungs="inline").rungs == ("inline",)  # type: ignore[arg-type]


def test_all_matches_exports() -> None:
    exported = {n for n in dir(asyncpool) if not n.startswith("_")}
    assert set(asyncpool.__all__) == exported
    for name in asyncpool.__all__:
        assert getattr(asyncpool, name).__module__.startswith("asyncpool")


@pytest.mark.asyncio
async def test_invalid_per_call_options() -> None:
    async with ResilientPool(max_workers=1, rungs=("inline",)) as pool:
        with pytest.raises(ValueError, match=r"chunk_size=0"):
            await pool.map(abs, [1], chunk_size=0)
        with pytest.raises(ValueError, match=r"timeout=-1"):
            await pool.map(abs, [1], timeout=-1)
        with pytest.raises(ValueError, match=r"cancel_running='stop'"):
            await pool.map(abs, [1], cancel_running="stop")  # type: ignore[arg-type]
