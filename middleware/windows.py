"""Time windows for rate-limit style quotas.

A ``Window`` is an absolute period ``[start, end)`` in epoch seconds: the billing period a source
reports, or one period of a fixed ``Period`` (every minute, every calendar month, ...). Counters
belong to one window and start from zero in the next.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import NamedTuple

from .errors import ConfigurationError

_NAMED = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}


# A named tuple: windowed buckets are dict keys on every request, and a tuple hashes in C where a
# frozen dataclass runs a Python __hash__ each time.
class Window(NamedTuple):
    """An absolute period ``[start, end)`` in epoch seconds."""

    start: float
    end: float

    def contains(self, now: float) -> bool:
        return self.start <= now < self.end

    @property
    def seconds(self) -> float:
        return self.end - self.start


def calendar_month(now: float) -> Window:
    """The UTC calendar month that contains ``now``."""
    day = datetime.fromtimestamp(now, UTC)
    start = datetime(day.year, day.month, 1, tzinfo=UTC)
    end = datetime(day.year + (day.month == 12), day.month % 12 + 1, 1, tzinfo=UTC)
    return Window(start.timestamp(), end.timestamp())


# A named tuple for the reason Window is one: a rule's Period is part of the key the engine looks
# its plan up by, on every request.
class Period(NamedTuple):
    """A fixed, repeating window: a number of seconds (aligned to the epoch) or ``"month"``."""

    seconds: float | None = None  # None means the calendar month

    @classmethod
    def parse(cls, value: str | float | int | Period) -> Period:
        if isinstance(value, Period):
            return value
        if value == "month":
            return cls(None)
        seconds = _NAMED.get(value) if isinstance(value, str) else float(value)
        if seconds is None or seconds <= 0 or isinstance(value, bool):
            raise ConfigurationError(f"window must be seconds > 0, 'second', 'minute', 'hour', 'day' or 'month', "
                                     f"got {value!r}")
        return cls(seconds)

    def window_at(self, now: float) -> Window:
        if self.seconds is None:
            return calendar_month(now)
        start = now - now % self.seconds
        return Window(start, start + self.seconds)


def current_window(window: Window | Period | None, now: float) -> Window | None:
    """The window a request at ``now`` counts in (None: a count quota, no window)."""
    if window is None:
        return None
    if isinstance(window, Period):
        return window.window_at(now)
    # A reported billing period that is over (the cache has not seen the next one yet): count in
    # the calendar month until the source says otherwise.
    return window if now < window.end else calendar_month(now)
