"""The node's Agent Card (built as the SDK's ``AgentCard``, signed with the SDK's card signer) and the
checks of a remote card's signatures.

A card signature is a JWS over the SDK's canonical form of the card (RFC 8785 of the card without its
signatures and with empty values removed), ``alg`` ``EdDSA``, ``kid`` the node's public key in hex: any A2A
client can verify it with the node's key, which is also its DarkMatter agent_id.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from a2a.server.request_handlers.response_helpers import agent_card_to_dict
from a2a.types import (AgentCapabilities, AgentCard, AgentInterface, AgentSkill, HTTPAuthSecurityScheme,
                       SecurityScheme)
from a2a.utils.constants import TransportProtocol
from a2a.utils.signing import (InvalidSignaturesError, NoSignatureError, create_agent_card_signer,
                               create_signature_verifier)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from darkmatter.api import __version__

from darkmatter_a2a_bridge.paths import (CARD_PATH, JSONRPC_PATH, JSONRPC_SUBPATH,  # noqa: F401 - re-exported
                                         LEGACY_CARD_PATH, MOUNT, REST_PATH, REST_SUBPATH)
from darkmatter_a2a_bridge.settings import Settings

A2A_VERSION = "1.0"
HEX_KEY = re.compile(r"^[0-9a-fA-F]{64}$")
SIGNATURE_ALGORITHMS = ["EdDSA", "ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]


def build_card(node: Any, settings: Settings) -> AgentCard:
    """The node's card: name and description from its display name and bio, skills from the settings (or one
    made from the bio), the JSON-RPC and REST interfaces at the node's base URL, signed with its key."""
    base = node.base_url.rstrip("/")
    name = node.state.get("display_name") or f"DarkMatter agent {node.agent_id[:12]}"
    bio = node.state.get("bio") or "A DarkMatter mesh agent."
    if settings.skills:
        skills = [AgentSkill(id=s.id, name=s.name, description=s.description, tags=s.tags or ["darkmatter"],
                             examples=s.examples) for s in settings.skills]
    else:
        skills = [AgentSkill(id="ask", name=f"Ask {name}"[:100], description=bio, tags=["darkmatter"])]
    card = AgentCard(
        name=name, description=bio, version=__version__,
        supported_interfaces=[
            AgentInterface(url=base + JSONRPC_PATH, protocol_binding=TransportProtocol.JSONRPC,
                           protocol_version=A2A_VERSION),
            AgentInterface(url=base + REST_PATH, protocol_binding=TransportProtocol.HTTP_JSON,
                           protocol_version=A2A_VERSION)],
        capabilities=AgentCapabilities(streaming=True, push_notifications=False),
        default_input_modes=["text/plain", "application/json"], default_output_modes=["text/plain"],
        skills=skills)
    if settings.inbound == "local":
        card.security_schemes["bearer"].CopyFrom(SecurityScheme(http_auth_security_scheme=HTTPAuthSecurityScheme(
            scheme="bearer", description="Callers that are not on this machine send the node's token "
                                         "(the <state file>.token beside its state file)")))
    return sign_card(card, node)


def sign_card(card: AgentCard, node: Any) -> AgentCard:
    # NOTE: the SDK signer needs the key object; the private key never leaves this process.
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(node.identity.private_key_hex))
    signer = create_agent_card_signer(key, {"alg": "EdDSA", "kid": node.public_key_hex, "typ": "JOSE"})
    return signer(card)


def card_json(card: AgentCard, *, legacy: bool = False) -> dict:
    """The card as served. The legacy path adds the 0.3 connection fields, which a 1.0 client ignores (they
    are not part of what the signature covers) and a 0.3 client needs."""
    body = agent_card_to_dict(card)
    if legacy:
        body.update(url=card.supported_interfaces[0].url, preferredTransport=TransportProtocol.JSONRPC.value,
                    protocolVersion="0.3.0")
    return body


# --- remote cards --------------------------------------------------------------------------------


def signature_keys(card: AgentCard) -> list[dict]:
    """The decoded protected headers of a card's signatures (unparseable ones are skipped)."""
    headers = []
    for signature in card.signatures:
        try:
            padded = signature.protected + "=" * (-len(signature.protected) % 4)
            header = json.loads(base64.urlsafe_b64decode(padded.encode()))
        except (binascii.Error, ValueError, UnicodeDecodeError):
            continue
        if isinstance(header, dict):
            headers.append(header)
    return headers


def verify_card(card: AgentCard, jwks: dict[str, Any]) -> str:
    """Check a signed card with the SDK's verifier; return the ``kid`` of its signature(s), or raise
    ValueError saying why none verifies.

    A ``kid`` of 64 hex characters is an Ed25519 public key (DarkMatter's convention); otherwise the key is
    looked up by ``kid`` in the JSON Web Key Sets already fetched from the signatures' ``jku`` (``jwks``:
    jku -> set)."""
    from jwt import PyJWKSet
    from jwt.exceptions import PyJWKError, PyJWKSetError

    def key_provider(kid: str | None, jku: str | None):
        if isinstance(kid, str) and HEX_KEY.match(kid):
            try:
                return Ed25519PublicKey.from_public_bytes(bytes.fromhex(kid))
            except ValueError:
                raise PyJWKError("kid is not an Ed25519 public key") from None
        keyset = jwks.get(jku or "")
        if keyset is None:
            raise PyJWKError("no key for this kid")
        try:
            for key in PyJWKSet.from_dict(keyset).keys:
                if kid is None or key.key_id == kid:
                    return key
        except PyJWKSetError as exc:
            raise PyJWKError(str(exc)) from None
        raise PyJWKError("kid not in the key set")

    kids = [str(h.get("kid"))[:80] for h in signature_keys(card)]
    try:
        create_signature_verifier(key_provider, SIGNATURE_ALGORITHMS)(card)
    except NoSignatureError:
        raise ValueError("the card has no signature") from None
    except InvalidSignaturesError:
        raise ValueError(f"no signature of the card verifies (kid {', '.join(kids) or 'none'})") from None
    return ", ".join(kids) or "unknown"
