"""Ed25519 identity and the signature strings of docs/protocol.md §3."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from darkmatter.wire import cj, h, h_metadata

V2_PREFIX = "darkmatter-sig-v2"


@dataclass(frozen=True, repr=False)
class Identity:
    """A keypair. `repr` never shows the private key."""

    private_key_hex: str
    public_key_hex: str

    @classmethod
    def generate(cls) -> Identity:
        return cls.from_private_hex(Ed25519PrivateKey.generate().private_bytes_raw().hex())

    @classmethod
    def from_private_hex(cls, private_hex: str) -> Identity:
        key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(private_hex))
        public = key.public_key().public_bytes_raw()
        return cls(private_key_hex=private_hex.lower(), public_key_hex=public.hex())

    def sign(self, text: str) -> str:
        key = _PRIVATE.get(self.private_key_hex)
        if key is None:  # NOTE: loading the key cost as much as signing; keep one per identity
            key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(self.private_key_hex))
            _remember(_PRIVATE, self.private_key_hex, key)
        return key.sign(text.encode("utf-8")).hex()

    def __repr__(self) -> str:
        return f"Identity(public_key_hex={self.public_key_hex!r})"


def verify(public_key_hex: str | None, text: str, signature_hex: str | None) -> bool:
    """True when `signature_hex` is a valid Ed25519 signature of `text` under the key."""
    if not public_key_hex or not signature_hex:
        return False
    try:
        key = _PUBLIC.get(public_key_hex)
        if key is None:
            key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex))
            _remember(_PUBLIC, public_key_hex, key)
        key.verify(bytes.fromhex(signature_hex), text.encode("utf-8"))
    except (ValueError, InvalidSignature):
        return False
    return True


# Loaded key objects by hex, bounded (a node signs with one key and verifies its connections' keys).
_KEYS_MAX = 1024
_PRIVATE: dict[str, Ed25519PrivateKey] = {}
_PUBLIC: dict[str, Ed25519PublicKey] = {}


def _remember(cache: dict, hex_key: str, key: object) -> None:
    if len(cache) >= _KEYS_MAX:
        cache.pop(next(iter(cache)))
    cache[hex_key] = key


def keys_match(private_hex: str, public_hex: str) -> bool:
    try:
        return Identity.from_private_hex(private_hex).public_key_hex == public_hex.lower()
    except ValueError:
        return False


# --- signed strings ----------------------------------------------------------------------


def v1_string(agent_id: str, message_id: str, timestamp: str, text: str) -> str:
    """§3.4: the 0.2 signature over a message or a response."""
    return f"{agent_id}\n{message_id}\n{timestamp}\n{text}"


def v2_string(purpose: str, *fields: object) -> str:
    """§3.5: `darkmatter-sig-v2`, the purpose, then each field exactly as sent."""
    return "\n".join([V2_PREFIX, purpose, *("" if f is None else str(f) for f in fields)])


def v2_message(from_id: str, to_id: str, message_id: str, timestamp: str, hops: int, webhook: str,
               content: str, metadata: object) -> str:
    return v2_string("message", from_id, to_id, message_id, timestamp, hops, webhook, h(content),
                     h_metadata(metadata))


def v2_webhook_update(message_id: str, type_: str, agent_id: str, target: str | None, timestamp: str,
                      text: str | None, metadata: object) -> str:
    return v2_string("webhook_update", message_id, type_, agent_id, target or "", timestamp, h(text or ""),
                     h_metadata(metadata))


def v2_beacon(beacon: dict) -> str:
    return v2_string("beacon", cj({k: v for k, v in beacon.items() if k != "signature_v2_hex"}))


def peer_update_string(agent_id: str, new_url: str, timestamp: str) -> str:
    """§6.3: peer_update keeps its own 0.2 format."""
    return f"peer_update\n{agent_id}\n{new_url}\n{timestamp}"
