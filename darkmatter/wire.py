"""Wire conventions of docs/protocol.md §2: errors, JSON, ids, timestamps, URLs, sizes.

Pure functions with no I/O, shared by the kernel and every transport.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import json
import math
import re
import secrets
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote, urlsplit

import orjson

MAX_BODY = 1024 * 1024
MAX_CONTENT_BYTES = 65536
MAX_METADATA_BYTES = 16384
MAX_METADATA_DEPTH = 16
MAX_URL = 2048
MAX_ID = 128
MAX_BIO = 1000
MAX_NAME = 100
MAX_NOTE = 1000
MAX_IMPRESSION = 2000
FRESH_SECONDS = 300

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x1f\x7f\s]")  # \s on str: exactly what str.isspace() accepts
_UNRESERVED = re.compile(r"^[A-Za-z0-9\-._~]+$")
_HEX = re.compile(r"^[0-9a-fA-F]+$")
_SELF_CERT = re.compile(r"^[0-9a-f]{64}$")


class ProtocolError(Exception):
    """A refusal with an HTTP status, a §2.2 code and a human-readable text."""

    def __init__(self, status: int, code: str, error: str, **extra: Any):
        super().__init__(error)
        self.status = status
        self.code = code
        self.error = error
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "code": self.code, **self.extra}


def bad(error: str, code: str = "invalid_field") -> ProtocolError:
    return ProtocolError(400, code, error)


def forbidden(error: str, code: str = "forbidden") -> ProtocolError:
    return ProtocolError(403, code, error)


# --- canonical JSON and hashes (§2.7) ---------------------------------------------------------


def cj(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def h(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


_H_EMPTY = hashlib.sha256(b"{}").hexdigest()


def h_metadata(metadata: Any) -> str:
    if metadata is None or (type(metadata) is dict and not metadata):
        return _H_EMPTY
    return h(cj(metadata))


# --- strict JSON (§2.1) --------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-strict JSON constant {name}")


def _check_strings(value: Any, depth: int = 0) -> None:
    if depth > 64:
        raise ValueError("JSON nested too deeply")
    if isinstance(value, str):
        value.encode("utf-8")  # lone surrogates raise UnicodeEncodeError
    elif isinstance(value, dict):
        for k, v in value.items():
            k.encode("utf-8")
            _check_strings(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_strings(v, depth + 1)


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


# Digits that may make an integer wider than 64 bits, which orjson reads as a float (the standard library keeps
# it exact); such a body takes the standard library's path.
_LONG_DIGITS = re.compile(rb"[0-9]{19}")


def loads_strict(raw: bytes | str) -> Any:
    """Parse JSON as §2.1 demands, raising ProtocolError(400 invalid_json) on any fault."""
    # NOTE: the fast path: orjson parses a mesh body about 5x faster. What it accepts, the standard library
    # path below accepts with the same value (orjson refuses lone surrogates, invalid UTF-8 and NaN itself);
    # deep nesting and integers over 64 bits never take it, and anything orjson refuses is decided below.
    if (type(raw) is bytes and raw.count(b"{") + raw.count(b"[") <= 64
            and not _LONG_DIGITS.search(raw)):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        value = _DECODER.decode(text)
        # NOTE: the walk is only needed when it could find something: in text decoded here as UTF-8 a lone
        # surrogate can only come from a \uD800-\uDFFF escape (a str given by the caller may hold one
        # itself, so it is always walked), and nesting deeper than 64 needs more than 64 opening brackets.
        # Most bodies have neither, and walking them cost more than parsing.
        if (text is raw or _SURROGATE_ESCAPE.search(text)
                or text.count("{") + text.count("[") > 64):
            _check_strings(value)
    except (ValueError, UnicodeError, RecursionError) as exc:
        raise ProtocolError(400, "invalid_json", "Invalid JSON body") from exc
    return value


def dumps_compact(value: Any, *, newline: bool = False) -> bytes:
    """Compact UTF-8 JSON (no spaces; non-ASCII characters as they are; a final newline with ``newline``), as
    state files, journal records and mesh answers are written. Floats that JSON cannot hold (NaN, infinities)
    are written as null.

    NOTE: orjson encodes about 10x faster than the standard library, on the path of every accepted message (its
    journal record and its answer); what orjson refuses (integers over 64 bits, keys that are not strings)
    takes the standard library's path. Both write the same values; a float may be spelt differently (1e-7 for
    the standard library's 1e-07)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_APPEND_NEWLINE if newline else None)
    except TypeError:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        return (text + "\n" if newline else text).encode("utf-8")


def loads_object(raw: bytes | str) -> dict[str, Any]:
    value = loads_strict(raw)
    if not isinstance(value, dict):
        raise ProtocolError(400, "invalid_json", "Invalid JSON body: expected an object")
    return value


# --- field access -------------------------------------------------------------------------


def require(body: dict, *names: str, error: str = "Missing required fields") -> None:
    missing = [n for n in names if body.get(n) in (None, "")]
    if missing:
        raise ProtocolError(400, "missing_fields", f"{error}: {', '.join(missing)}")


def get_str(body: dict, name: str, *, required: bool = False, max_len: int | None = None) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise ProtocolError(400, "missing_fields", f"Missing required fields: {name}")
        return None
    if not isinstance(value, str):
        raise bad(f"Field '{name}' must be a string")
    if max_len is not None and len(value) > max_len:
        raise bad(f"Field '{name}' is longer than {max_len} characters")
    return value


def get_int(body: dict, name: str, default: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if type(value) is not int:  # a boolean is never an integer
        raise bad(f"Field '{name}' must be an integer")
    return value


def get_bool(body: dict, name: str, default: bool | None = None) -> bool | None:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"Field '{name}' must be a boolean")
    return value


def truncate(value: Any, limit: int) -> str:
    if not isinstance(value, str):
        return ""
    return value[:limit]


# --- identifiers (§2.4) and keys (§3.1) ------------------------------------------------------


def check_id(value: Any, field: str = "agent_id") -> str:
    if not isinstance(value, str) or not value:
        raise ProtocolError(400, "missing_fields" if value in (None, "") else "invalid_field",
                            f"Field '{field}' must be a non-empty string")
    if len(value) > MAX_ID or _CONTROL.search(value):
        raise bad(f"Field '{field}' is not a valid id (1-128 characters, no control characters)")
    return value


def check_message_id(value: Any, field: str = "message_id") -> str:
    check_id(value, field)
    if not _UNRESERVED.match(value) or value in (".", ".."):
        raise bad(f"Field '{field}' may only hold the characters A-Z a-z 0-9 - . _ ~")
    return value


def is_message_id(value: Any) -> bool:
    try:
        check_message_id(value)
    except ProtocolError:
        return False
    return True


def check_hex(value: Any, field: str, length: int) -> str:
    if not isinstance(value, str) or len(value) != length or not _HEX.match(value):
        raise bad(f"Field '{field}' must be {length} hex characters")
    return value.lower()


def is_self_certifying(agent_id: str) -> bool:
    return bool(_SELF_CERT.match(agent_id or ""))


def new_message_id() -> str:
    return "msg-" + secrets.token_hex(16)


def new_request_id() -> str:
    return "req-" + secrets.token_hex(8)


# --- timestamps (§2.5) ---------------------------------------------------------------------


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def parse_ts(value: Any) -> datetime | None:
    if not isinstance(value, str) or len(value) > 64:
        return None
    text = value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value
    try:
        ts = datetime.fromisoformat(text)
    except ValueError:
        return None
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=timezone.utc)
    return ts


def is_fresh(value: Any, window: float = FRESH_SECONDS) -> bool:
    ts = parse_ts(value)
    if ts is None:
        return False
    return abs((datetime.now(timezone.utc) - ts).total_seconds()) <= window


def age_seconds(value: Any) -> float | None:
    ts = parse_ts(value)
    if ts is None:
        return None
    return (datetime.now(timezone.utc) - ts).total_seconds()


# --- URLs (§2.6) ---------------------------------------------------------------------------

_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
# NOTE: ``memory`` addresses nodes of one process that share a memory transport (darkmatter.testing); a node
# uses a URL only through a transport that handles its scheme, so an HTTP-only node never reaches one.
SCHEMES = ("http", "https", "memory")


def check_url(url: Any, field: str = "url") -> str:
    """Validate a URL per §2.6; raises ProtocolError 400 with the reason."""
    if not isinstance(url, str) or not url:
        raise bad(f"Field '{field}' must be a URL")
    if len(url) > MAX_URL:
        raise bad(f"Field '{field}' is longer than {MAX_URL} characters")
    if _CONTROL_OR_SPACE.search(url):
        raise bad(f"Field '{field}' contains whitespace or control characters")
    _check_url_parts(url, field)
    return url


def _check_url_parts(url: str, field: str):
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise bad(f"Field '{field}' is not a valid URL") from None
    if parts.scheme.lower() not in SCHEMES:
        raise bad(f"Field '{field}' must be an http or https URL")
    if not parts.hostname:
        raise bad(f"Field '{field}' has no host")
    if "@" in parts.netloc:
        raise bad(f"Field '{field}' must not carry user information")
    if port is not None and not 1 <= port <= 65535:
        raise bad(f"Field '{field}' has an invalid port")
    if parts.netloc.endswith(":"):
        raise bad(f"Field '{field}' has an empty port")
    return parts


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def normalize(url: str) -> str:
    """The base URL of §2.6: validated, no query/fragment, lowercase, default port dropped, suffix stripped."""
    check_url(url)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = parts.hostname.lower()
    port = parts.port
    netloc = _host_for_url(host)
    if port is not None and not (scheme == "http" and port == 80) and not (scheme == "https" and port == 443):
        netloc += f":{port}"
    path = parts.path.rstrip("/")
    for suffix in ("/mcp", "/__darkmatter__"):
        if path.endswith(suffix):
            path = path[: -len(suffix)].rstrip("/")
            break
    return f"{scheme}://{netloc}{path}"


def try_normalize(url: Any) -> str | None:
    try:
        return normalize(url)
    except ProtocolError:
        return None


def origin_key(url: str) -> tuple[str, str, int, str]:
    base = normalize(url)
    parts = urlsplit(base)
    host = parts.hostname
    if host in _LOOPBACK_NAMES:
        host = "loopback"
    port = parts.port or {"https": 443, "http": 80}.get(parts.scheme, 0)
    return (parts.scheme, host, port, parts.path)


def urls_match(a: Any, b: Any) -> bool:
    try:
        return origin_key(a) == origin_key(b)
    except (ProtocolError, TypeError):
        return False


def endpoint(base: str, name: str, *ids: str) -> str:
    url = f"{base}/__darkmatter__/{name}"
    for part in ids:
        url += "/" + quote(part, safe="-._~")
    return url


def host_of(url: str) -> str:
    return urlsplit(url).hostname or ""


_HOST_PATTERNS = (
    re.compile(r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$"),
    re.compile(r"^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$"),
)


def valid_host_header(host: Any) -> bool:
    return isinstance(host, str) and any(p.match(host) for p in _HOST_PATTERNS)


@functools.lru_cache(maxsize=512)
def is_loopback_host(host: str) -> bool:
    """True for `localhost`, 127.0.0.0/8 and ::1 (with or without brackets and port). Cached: every mesh request
    on a loopback bind checks its Host header, which is nearly always the same few strings."""
    if not valid_host_header(host) and not valid_host_header(f"[{host}]"):
        return False
    name = host
    if name.startswith("["):
        name = name[1:].split("]", 1)[0]
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    name = name.lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


# --- webhook shape (§7.1) ------------------------------------------------------------------


WEBHOOK_PATH = "/__darkmatter__/webhook/"


def webhook_problem(webhook: Any, message_id: str) -> str | None:
    """Return why `webhook` is not a valid webhook for `message_id`, or None if it is."""
    # NOTE: a sender puts the same base before every webhook of its messages. For a valid message id (only
    # A-Z a-z 0-9 - . _ ~, never "." or "..") every check below but the length depends on the base alone:
    # the id brings no ':', '/', '?', '#', '%', '\\', space or dot segment. So a base's verdict is computed
    # once, with a stand-in id, and remembered: parsing the URL was ~5 % of the CPU of accepting a message.
    if type(webhook) is str and len(webhook) <= MAX_URL and is_message_id(message_id):
        tail = WEBHOOK_PATH + message_id
        if webhook.endswith(tail):
            return _webhook_base_problem(webhook[:-len(tail)])
    return _webhook_problem(webhook, message_id)


@functools.lru_cache(maxsize=256)
def _webhook_base_problem(base: str) -> str | None:
    return _webhook_problem(base + WEBHOOK_PATH + "x", "x")


def _webhook_problem(webhook: Any, message_id: str) -> str | None:
    try:
        if not isinstance(webhook, str) or not webhook or len(webhook) > MAX_URL or _CONTROL_OR_SPACE.search(webhook):
            check_url(webhook, "webhook")  # raises with the reason
        parts = _check_url_parts(webhook, "webhook")
    except ProtocolError as exc:
        return exc.error
    if parts.query or parts.fragment or "?" in webhook or "#" in webhook:
        return "webhook must not carry a query or fragment"
    path = parts.path
    if "%" in path or "\\" in path:
        return "webhook path must not contain '%' or '\\'"
    segments = path.split("/")
    if any(s in (".", "..") for s in segments):
        return "webhook path must not contain '.' or '..' segments"
    if not path.endswith(WEBHOOK_PATH + message_id):
        return "webhook path must end with /__darkmatter__/webhook/<message_id>"
    return None


# --- metadata (§2.3) -----------------------------------------------------------------------


def _depth_and_finite(value: Any, depth: int) -> int:
    if isinstance(value, float) and not math.isfinite(value):
        raise bad("metadata numbers must be finite")
    if isinstance(value, dict):
        return max([_depth_and_finite(v, depth + 1) for v in value.values()] or [depth + 1])
    if isinstance(value, list):
        return max([_depth_and_finite(v, depth + 1) for v in value] or [depth + 1])
    return depth


def check_metadata(value: Any) -> dict:
    """Validate metadata: object, CJ ≤ 16 KiB (else 413), depth ≤ 16, finite numbers (else 400)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad("Field 'metadata' must be an object")
    if not value:
        return value
    if _depth_and_finite(value, 0) > MAX_METADATA_DEPTH:
        raise bad(f"metadata is nested deeper than {MAX_METADATA_DEPTH}")
    if len(cj(value).encode("utf-8")) > MAX_METADATA_BYTES:
        raise ProtocolError(413, "too_large", f"metadata exceeds {MAX_METADATA_BYTES} bytes")
    return value


def check_content(value: Any, field: str = "content") -> str:
    if not isinstance(value, str):
        raise bad(f"Field '{field}' must be a string")
    if len(value.encode("utf-8")) > MAX_CONTENT_BYTES:
        raise ProtocolError(413, "too_large", f"Content exceeds {MAX_CONTENT_BYTES} bytes")
    return value


# --- address classes (§7.3) ----------------------------------------------------------------

_NEVER_V4 = [ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "169.254.0.0/16", "192.0.0.0/24", "192.0.2.0/24", "198.18.0.0/15", "198.51.100.0/24",
    "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4", "255.255.255.255/32", "100.100.100.200/32")]
_LOCAL_V4 = [ipaddress.ip_network(n) for n in (
    "127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")]
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_6TO4 = ipaddress.ip_network("2002::/16")
_EC2_V6 = ipaddress.ip_address("fd00:ec2::254")


def embedded_v4(ip: ipaddress._BaseAddress) -> ipaddress.IPv4Address | None:
    if isinstance(ip, ipaddress.IPv4Address):
        return ip
    if ip.ipv4_mapped:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _6TO4:
        return ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF)
    return None


@functools.lru_cache(maxsize=1024)
def classify(address: str) -> str:
    """``global``, ``local`` (loopback or private) or ``never`` (§7.3). Cached: a pure function of the address,
    asked on every outbound request."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "never"
    v4 = embedded_v4(ip)
    if v4 is not None:
        if any(v4 in n for n in _NEVER_V4):
            return "never"
        if any(v4 in n for n in _LOCAL_V4):
            return "local"
        return "global" if v4.is_global else "never"
    # NOTE: ::1 lies inside ::/8, which ipaddress counts as reserved: test loopback first.
    if ip.is_loopback:
        return "local"
    if ip == _EC2_V6 or ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved:
        return "never"
    if ip in ipaddress.ip_network("fc00::/7") or ip.is_site_local:  # fec0::/10: deprecated site-local
        return "local"
    if ip in ipaddress.ip_network("2001:db8::/32"):
        return "never"
    return "global" if ip.is_global else "never"


def literal_class(host: str) -> str | None:
    """The class of a literal-address host, None for a name."""
    name = host.strip("[]")
    try:
        ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return None
    return classify(name)
