"""Processes forked after ``import middleware`` (gunicorn --preload, multiprocessing with fork).

The store, even the middleware, may be built before the fork; each child must still hand out ids
of its own, or two children's reservations are one member in Redis and one of them counts nothing.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from multiprocessing.connection import Connection

import pytest

from middleware import Bucket, RedisStore
from middleware.stores.base import new_id
from tests.servers import RedisServer

FORK = multiprocessing.get_context("fork")


def _ids(conn: Connection) -> None:
    conn.send([new_id() for _ in range(1000)])
    conn.close()


def test_children_forked_after_import_hand_out_distinct_ids() -> None:
    new_id()  # the parent has already used its sequence
    pipes = [FORK.Pipe(duplex=False) for _ in range(2)]
    children = [FORK.Process(target=_ids, args=(send,)) for _, send in pipes]
    for child in children:
        child.start()
    try:
        first, second = (set(receive.recv()) for receive, _ in pipes)
    finally:
        for child in children:
            child.join(10)
    assert len(first) == len(second) == 1000
    assert not first & second


def _reserve(url: str, project: str, tries: int, conn: Connection) -> None:
    async def run() -> int:
        store = RedisStore(url)  # a store built in the child, as a worker's lifespan would
        admitted = 0
        for _ in range(tries):
            decision = await store.reserve(Bucket(project, "things"), 1, 10, 60_000)
            if decision.admitted:
                admitted += 1
                assert decision.reservation is not None
                await store.commit(decision.reservation)
        await store.aclose()
        return admitted

    conn.send(asyncio.run(run()))
    conn.close()


@pytest.mark.slow
def test_children_forked_after_import_admit_exactly_the_limit(redis_server: RedisServer) -> None:
    import redis

    new_id()
    pipes = [FORK.Pipe(duplex=False) for _ in range(2)]
    children = [FORK.Process(target=_reserve, args=(redis_server.url, "forked", 9, send)) for _, send in pipes]
    for child in children:
        child.start()
    try:
        admitted = [receive.recv() for receive, _ in pipes]
    finally:
        for child in children:
            child.join(10)
    assert sum(admitted) == 10, admitted
    client = redis.Redis(port=redis_server.port)
    try:
        assert int(client.get("quota:{forked}:things:used") or 0) == 10
    finally:
        client.close()
