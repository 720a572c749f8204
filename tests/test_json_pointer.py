"""RFC 6901 JSON pointers, as JSONSource reads them: what the RFC resolves, and what it rejects."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from middleware import ConfigurationError, JSONSource
from middleware.sources.generic import _MISSING, parse_pointer, resolve_pointer

# RFC 6901, section 5: the document and every pointer with what it references.
RFC_DOC = json.loads(r'''{"foo": ["bar", "baz"], "": 0, "a/b": 1, "c%d": 2, "e^f": 3, "g|h": 4, "i\\j": 5,
                          "k\"l": 6, " ": 7, "m~n": 8}''')
RFC_EXAMPLES: list[tuple[str, Any]] = [
    ("", RFC_DOC), ("/foo", ["bar", "baz"]), ("/foo/0", "bar"), ("/", 0), ("/a~1b", 1), ("/c%d", 2),
    ("/e^f", 3), ("/g|h", 4), ("/i\\j", 5), ('/k"l', 6), ("/ ", 7), ("/m~0n", 8),
]


@pytest.mark.parametrize(("pointer", "expected"), RFC_EXAMPLES)
def test_the_rfcs_own_examples(pointer: str, expected: Any) -> None:
    assert resolve_pointer(RFC_DOC, pointer) == expected


@pytest.mark.parametrize("pointer", ["a", "foo/0", "~0", "/~", "/a~", "/~2", "/a~b", "/~/", "/m~0n/~x"])
def test_malformed_pointers_are_configuration_errors(pointer: str) -> None:
    with pytest.raises(ConfigurationError):
        parse_pointer(pointer)
    with pytest.raises(ConfigurationError):  # at start-up, wherever the pointer is given
        JSONSource("http://q.test", limits={"w": "/w"}, used={"w": pointer})


@pytest.mark.parametrize("token", ["01", "00", "007", "+1", "-1", "-", " 1", "1 ", "1.0", "1e0", "0x1",
                                   "\u0661", "\uff11", "\u00b2", "1_0", ""])
def test_array_tokens_the_rfc_rejects_resolve_to_nothing(token: str) -> None:
    doc = {"a": list(range(20))}
    assert resolve_pointer(doc, f"/a/{token}") is _MISSING


def test_unescaping_order_and_missing_members() -> None:
    doc = {"~1": "tilde-one", "/": "slash", "~": "tilde", "a": {"b": None}, "n": 5, "s": "text"}
    assert resolve_pointer(doc, "/~01") == "tilde-one"  # "~1" is read before "~0": never "/"
    assert resolve_pointer(doc, "/~1") == "slash" and resolve_pointer(doc, "/~0") == "tilde"
    assert resolve_pointer(doc, "/a/b") is None  # null is a value, not a missing member
    for pointer in ("/x", "/a/c", "/n/0", "/s/0", "/a/b/c"):
        assert resolve_pointer(doc, pointer) is _MISSING, pointer


def escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                                        max_size=4), max_leaves=10)


@given(st.lists(st.text(max_size=8), max_size=6), json_values)
def test_any_keys_round_trip_through_escaping(keys: list[str], value: Any) -> None:
    doc: Any = value
    for key in reversed(keys):
        doc = {key: doc}
    pointer = "".join("/" + escape(key) for key in keys)
    assert parse_pointer(pointer) == tuple(keys)
    assert resolve_pointer(doc, pointer) == value


@given(st.lists(st.integers(), min_size=1, max_size=30), st.data())
def test_array_indexes_in_canonical_form_resolve_and_others_do_not(items: list[int], data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(items) - 1))
    assert resolve_pointer(items, f"/{index}") == items[index]
    assert resolve_pointer(items, f"/{len(items)}") is _MISSING
    padded = data.draw(st.integers(1, 3)) * "0" + str(index)
    signed = data.draw(st.sampled_from(["+", "-"])) + str(index)
    assert resolve_pointer(items, "/" + padded) is _MISSING
    assert resolve_pointer(items, "/" + signed) is _MISSING


@given(st.text(max_size=12))
def test_any_text_either_parses_or_is_refused_and_escapes_are_exact(pointer: str) -> None:
    try:
        tokens = parse_pointer(pointer)
    except ConfigurationError:
        assert not pointer.startswith("/") or "~" in pointer
        return
    assert pointer == "" or pointer.startswith("/")
    assert "".join("/" + escape(token) for token in tokens) == pointer  # escaping is a bijection


@given(st.text(alphabet=st.characters(categories=["Nd"]), min_size=1, max_size=3))
def test_only_ascii_digits_index_arrays(token: str) -> None:
    items = list(range(10))
    result = resolve_pointer(items, "/" + token)
    canonical = token.isascii() and (token == "0" or not token.startswith("0"))
    if canonical and int(token) < len(items):
        assert result == items[int(token)]
    else:
        assert result is _MISSING
