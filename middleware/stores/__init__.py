"""Usage stores: the embedded in-memory store and Redis."""

from .base import Bucket, BucketUsage, Decision, Reservation, SharedState, Store
from .leasing import LeasingStore
from .memory import MemoryStore
from .redis import RedisStore

__all__ = ["Bucket", "BucketUsage", "Decision", "LeasingStore", "MemoryStore", "RedisStore", "Reservation",
           "SharedState", "Store"]
