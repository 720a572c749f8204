"""Reading an upstream's answer within bounds: whatever it sends, it costs a bounded amount of stack.

Depth: ``json.loads`` recurses once per nested array or object, so 4 KB of ``[`` raises
RecursionError (an HTTP 500 and no back-off, had it escaped). Documents nested deeper than
MAX_DEPTH are refused before they are parsed, by a scan that does not recurse.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..errors import SourceInvalid

#: Quota documents nest a handful of levels; anything deeper than this is not one.
MAX_DEPTH = 64

_ESCAPE = re.compile(r"\\.", re.DOTALL)
#: With every escape gone, a string is a quote, no quote, a quote. Neither pattern backtracks.
_STRING = re.compile(r'"[^"]*"')
_RUN = re.compile(r"[\[{]+|[\]}]+")


def parse_json(body: bytes, *, status_code: int | None = None) -> Any:
    """``json.loads(body)``, but every failure (bad bytes, bad JSON, too deep) is a SourceInvalid."""
    try:
        # What json.loads(bytes) does itself; decoded first so that the scan sees characters.
        text = body.decode(json.detect_encoding(body), "surrogatepass")
        if _deeper_than(text, MAX_DEPTH):
            raise SourceInvalid(f"quota API answered JSON nested deeper than {MAX_DEPTH} levels",
                                status_code=status_code)
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: should the scan ever miss one
        raise SourceInvalid("quota API answered a body that is not JSON", status_code=status_code) from exc


def _deeper_than(text: str, limit: int) -> bool:
    """True when arrays and objects nest more than ``limit`` deep (or open more than that unclosed).

    Brackets inside strings do not count: escapes go first, then strings. Linear in the text,
    with no recursion; a document with fewer openings than ``limit`` is not scanned at all.
    """
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    skeleton = _STRING.sub("", _ESCAPE.sub("", text))
    for run in _RUN.finditer(skeleton):
        if skeleton[run.start()] in "[{":
            depth += run.end() - run.start()
            if depth > limit:
                return True
        else:
            depth -= run.end() - run.start()
    return False
