"""When a ``*_nowait`` fast path may stand in for the coroutine it shortcuts.

Stores and sources may answer without awaiting (``reserve_nowait``, ``settle_nowait``,
``fetch_nowait``), and the middleware asks those first. A subclass that overrides the coroutine
(``reserve``, say, to audit or to add a check) but not its fast path must still have its
coroutine called: the fast path is only used when it is defined at least as far down the class
hierarchy as every coroutine it stands for.
"""

from __future__ import annotations

from typing import Any


def nowait_usable(obj: Any, nowait: str, *awaited: str) -> bool:
    """True when ``obj.<nowait>`` may be called instead of awaiting each of ``awaited``."""
    mro = type(obj).__mro__

    def depth(name: str) -> int:
        return next((i for i, cls in enumerate(mro) if name in cls.__dict__), len(mro))

    return all(depth(nowait) <= depth(name) for name in awaited)
