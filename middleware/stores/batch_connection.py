"""The connection a RedisStore sends its script calls on: written in order, answered in order.

redis-py opens it (TLS, AUTH, SELECT, HELLO: whatever the client's URL asks), then the store takes
its transport over: each reply is parsed by hiredis as it arrives and answers its call's future
from the event loop's own callback. redis-py's read path (a stream reader, a parser wrapper and a
task step through several of its frames per reply) cost the worker more per call than the rest
of the call's I/O.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import hiredis
import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from redis._parsers.base import BaseParser


class BatchConnection(asyncio.Protocol):
    """Calls written one after another; each one's future answered with its reply, in order.

    A reply Redis sent as an error is the call's ResponseError (of the class redis-py's own reader
    would make: NoScriptError for NOSCRIPT...), set as the future's result: the connection is still
    in step. Once the connection is lost, every call
    waiting fails with ConnectionError and ``lost`` is true: open another.
    """

    def __init__(self, connection: aioredis.Connection, loop: asyncio.AbstractEventLoop) -> None:
        self._connection = connection
        self._loop = loop
        self._reader = hiredis.Reader(replyError=BaseParser.parse_error)
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._transport: Any = None  # asyncio's, or uvloop's (not an asyncio.Transport subclass)
        #: redis-py's stream protocol, told when the connection is lost: whoever closes redis-py's
        #: connection (its pool, on the client's aclose) waits for that.
        self._replaced: Any = None
        self.lost = False

    @classmethod
    async def open(cls, pool: aioredis.ConnectionPool) -> BatchConnection | PooledConnection:
        """A connection of ``pool``'s, connected and taken over (give it back with ``aclose``); one
        with no socket transport (fakeredis's) is used through redis-py instead."""
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        transport: Any = getattr(getattr(connection, "_writer", None), "transport", None)
        if not hasattr(transport, "set_protocol"):  # (uvloop's transports are not asyncio's subclasses)
            return PooledConnection(connection)
        if transport.is_closing():
            await pool.release(connection)
            raise redis_errors.ConnectionError("the Redis connection closed as it opened")
        protocol = cls(connection, asyncio.get_running_loop())
        protocol._transport, protocol._replaced = transport, transport.get_protocol()
        transport.set_protocol(protocol)
        return protocol

    def call(self, command: bytes) -> asyncio.Future[Any]:
        """Write one command (already in Redis's protocol); its future is answered with the reply."""
        future = self._loop.create_future()
        if self.lost or self._transport is None:
            future.set_exception(redis_errors.ConnectionError("the Redis connection is closed"))
            return future
        self._waiting.append(future)
        self._transport.write(command)
        return future

    def close(self, reason: str = "the Redis connection was reset while this call was in flight") -> None:
        """Close it: calls still waiting fail (a reply they never read would go to the next)."""
        if self._transport is not None:
            self._transport.close()
        self._lose(redis_errors.ConnectionError(reason))

    async def aclose(self, pool: aioredis.ConnectionPool) -> None:
        """Close it and give redis-py's connection back to ``pool`` (which reconnects it if used)."""
        self.close()
        await self._connection.disconnect(nowait=True)
        await pool.release(self._connection)

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        try:
            while (reply := self._reader.gets()) is not False:
                if isinstance(reply, hiredis.PushNotification):
                    continue  # out of band (RESP3): no call's reply
                if not self._waiting:
                    raise redis_errors.InvalidResponse("Redis answered a call that was never made")
                future = self._waiting.popleft()
                if not future.done():  # else its caller went away (a timeout): the reply is dropped
                    future.set_result(reply)
        except (hiredis.ProtocolError, redis_errors.InvalidResponse) as exc:
            self.close(f"Redis sent what could not be read: {exc}")

    def eof_received(self) -> bool:
        return False  # the transport closes itself: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self._replaced is not None:
            self._replaced.connection_lost(exc)
        self._lose(redis_errors.ConnectionError(f"Redis closed the connection{f': {exc}' if exc else ''}"))

    def _lose(self, error: Exception) -> None:
        self.lost = True
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(error)


class PooledConnection:
    """BatchConnection's calls through redis-py's own connection, one at a time: for connections
    with no socket transport to take over (fakeredis's)."""

    def __init__(self, connection: aioredis.Connection) -> None:
        self._connection = connection
        self._one_at_a_time = asyncio.Lock()
        self.lost = False

    async def call(self, command: bytes) -> Any:
        async with self._one_at_a_time:
            if self.lost:
                raise redis_errors.ConnectionError("the Redis connection is closed")
            try:
                await self._connection.send_packed_command(command, check_health=False)
                return await self._connection.read_response()
            except redis_errors.ResponseError as exc:
                return exc  # an error reply was read: the connection is still in step
            except BaseException:
                self.close()  # a call written but not read would leave its reply to the next
                raise

    def close(self, reason: str = "") -> None:
        self.lost = True

    async def aclose(self, pool: aioredis.ConnectionPool) -> None:
        self.lost = True
        await self._connection.disconnect(nowait=True)
        await pool.release(self._connection)
