"""A sample's JSON metadata parsed within bounds: at most `MAX_JSON_BYTES`, `MAX_JSON_DEPTH` levels of nesting
and numbers of `MAX_JSON_NUMBER_CHARS` characters; anything beyond is refused in one sentence, never parsed on."""

from __future__ import annotations

import json
from collections.abc import Callable

# JSON metadata limits: SA-1B's mask annotations (a few MB per image) fit; Rust's serde_json stops at 128
# levels; a 64-bit integer has 20 digits and a float's repr at most 24 characters.
MAX_JSON_BYTES = 16 << 20
MAX_JSON_DEPTH = 128
MAX_JSON_NUMBER_CHARS = 100


class _JsonOverLimit(ValueError):
    """A JSON member beyond the parsing limits; the message completes "member 'x.json' ..."."""


def _bounded_number(convert: type) -> Callable[[str], object]:
    def parse(text: str) -> object:
        if len(text) > MAX_JSON_NUMBER_CHARS:
            raise _JsonOverLimit(f"holds a number of {len(text)} characters, over the limit of {MAX_JSON_NUMBER_CHARS}")
        return convert(text)

    return parse


_PARSE_JSON_INT = _bounded_number(int)
_PARSE_JSON_FLOAT = _bounded_number(float)


def _nests_deeper_than(value: object, limit: int) -> bool:
    """Whether lists/objects nest more than `limit` levels (iterative: deep values must not exhaust the stack)."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        pending.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def parse_metadata(data: bytes, name: str) -> dict | str:
    """The JSON object of a metadata member, parsed within the limits, or why it is refused."""
    if len(data) > MAX_JSON_BYTES:
        return f"member {name!r} is {len(data)} bytes, over the {MAX_JSON_BYTES}-byte limit for JSON metadata"
    too_deep = f"member {name!r} nests JSON deeper than {MAX_JSON_DEPTH} levels"
    try:
        metadata = json.loads(data, parse_int=_PARSE_JSON_INT, parse_float=_PARSE_JSON_FLOAT)
    except _JsonOverLimit as exc:
        return f"member {name!r} {exc}"
    except RecursionError:
        return too_deep  # the parser gives up far beyond MAX_JSON_DEPTH
    except (UnicodeDecodeError, json.JSONDecodeError):
        return f"member {name!r} is not valid JSON"
    if not isinstance(metadata, dict):
        return f"member {name!r} is JSON but not an object"
    if _nests_deeper_than(metadata, MAX_JSON_DEPTH):
        return too_deep
    return metadata
