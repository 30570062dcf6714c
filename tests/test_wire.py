"""The fast paths of the wire rules (docs/protocol.md §2.1, §7.1) decide exactly as the plain rules do.

Reading a mesh body, writing a journal record or an answer, and checking a webhook are on the path of every
accepted message, so each has a fast path (orjson; a webhook base's verdict remembered). These properties
hold them to the plain rules: same values with the same types, same refusals, same verdicts.
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from darkmatter import wire
from darkmatter.wire import ProtocolError, dumps_compact, loads_strict, webhook_problem

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=30)


def same(a, b) -> bool:
    """Equal, with the same types all the way down (1 is not 1.0, -0.0 is not 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def plain_strict(raw: bytes):
    """§2.1 strict JSON with the standard library alone: what loads_strict must agree with."""
    def refuse(name):
        raise ValueError(name)

    def walk(value, depth=0):
        if depth > 64:
            raise ValueError("deep")
        if isinstance(value, str):
            value.encode("utf-8")
        elif isinstance(value, dict):
            for k, v in value.items():
                k.encode("utf-8")
                walk(v, depth + 1)
        elif isinstance(value, list):
            for v in value:
                walk(v, depth + 1)
    try:
        value = json.JSONDecoder(parse_constant=refuse).decode(raw.decode("utf-8"))
        walk(value)
    except (ValueError, UnicodeError, RecursionError):
        return "refused"
    return value


def strict(raw: bytes):
    try:
        return loads_strict(raw)
    except ProtocolError as exc:
        assert exc.status == 400 and exc.code == "invalid_json"
        return "refused"


@SETTINGS
@given(value=json_values, ascii_only=st.booleans())
def test_strict_reading_returns_every_value_with_its_type(value, ascii_only):
    raw = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8")
    assert same(strict(raw), value)  # an integer over 64 bits stays an exact int, never a float


ODD_PIECES = [b"NaN", b"Infinity", b"-Infinity", b"1e400", b'"\\ud800"', b'"\\udc00x"', b"\xff", b"\xef\xbb\xbf",
              b"[" * 70 + b"]" * 70, b"123456789012345678901234", b"-0", b'{"a":1,"a":2}', b"\x00", b"\t\r\n ",
              b'"\\u0000"', b"1E-400", b"tru", b"[1,]", b"{,}"]


@SETTINGS
@given(value=json_values, cut=st.integers(min_value=0, max_value=400), piece=st.sampled_from(ODD_PIECES),
       drop=st.integers(min_value=0, max_value=3))
def test_strict_reading_refuses_and_accepts_what_the_plain_rules_do(value, cut, piece, drop):
    raw = json.dumps(value, ensure_ascii=False).encode("utf-8")
    at = min(cut, len(raw))
    odd = raw[:at] + piece + raw[at + drop:]
    assert same(strict(odd), plain_strict(odd))
    assert same(strict(piece), plain_strict(piece))


@SETTINGS
@given(value=json_values)
def test_compact_json_holds_the_same_value_as_the_standard_librarys(value):
    written = dumps_compact(value)
    assert same(json.loads(written), value)
    assert dumps_compact(value, newline=True) == written + b"\n"
    if not any(isinstance(v, float) for v in _leaves(value)):  # floats may be spelt differently (1e-7, 1e-07)
        assert written == json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _leaves(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, list):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


def test_compact_json_takes_the_plain_path_for_what_orjson_refuses():
    assert dumps_compact({"n": 2**70, 1: "a"}) == b'{"n":1180591620717411303424,"1":"a"}'
    assert dumps_compact([float("nan"), float("inf")]) == b"[null,null]"
    with pytest.raises(UnicodeEncodeError):
        dumps_compact({"a": "\ud800"})  # a lone surrogate cannot be written as UTF-8 either way


# --- webhooks (§7.1) ------------------------------------------------------------------------------------------

BASES = ["http://127.0.0.1:8100", "https://example.com", "http://[::1]:9", "memory://n1", "http:/", "http:", "http://",
         "http://a@b:1", "http://h:0", "http://h:", "http://h/x/./y", "http://h/x/../y", "http://h?q", "http://h#f",
         "http://h/%41", "http://h\\x", "ftp://h", "//h", "h", "", "HTTP://H:65535/p", "http://h:65536", "http://[::1",
         "http://h /"]
message_ids = st.from_regex(r"\A[A-Za-z0-9\-._~]{1,40}\Z").filter(lambda m: m not in (".", ".."))


@SETTINGS
@given(base=st.sampled_from(BASES), edit=st.text(alphabet="abc:/?#%@.[]\\ \t~-_9", max_size=3),
       at=st.integers(min_value=0, max_value=30), first=message_ids, second=message_ids,
       other=st.sampled_from(["", ".", "..", "a/b", "a?b", "é", "a:b", "x" * 2100]))
def test_a_webhook_verdict_is_the_full_check_for_every_message_id(base, edit, at, first, second, other):
    base = base[:at] + edit + base[at:]
    for mid in (first, second, other):
        for webhook in (base + wire.WEBHOOK_PATH + mid, base + wire.WEBHOOK_PATH + mid + "/",
                        base + wire.WEBHOOK_PATH + first):
            assert webhook_problem(webhook, mid) == wire._webhook_problem(webhook, mid)


def test_a_remembered_base_still_refuses_a_webhook_too_long():
    base = "http://127.0.0.1:8100/" + "p" * (wire.MAX_URL - 22 - len(wire.WEBHOOK_PATH) - 2)
    assert webhook_problem(base + wire.WEBHOOK_PATH + "m1", "m1") is None  # the base is remembered as good
    webhook = base + wire.WEBHOOK_PATH + "m12"
    assert len(webhook) == wire.MAX_URL + 1
    assert webhook_problem(webhook, "m12") == f"Field 'webhook' is longer than {wire.MAX_URL} characters"
