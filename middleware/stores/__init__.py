"""Usage stores: the embedded in-memory store and Redis."""

from .base import Bucket, Decision, Reservation, Store
from .memory import MemoryStore
from .redis import RedisStore

__all__ = ["Bucket", "Decision", "MemoryStore", "RedisStore", "Reservation", "Store"]
