"""Pseudonymous subscriber ids: e-mail addresses never reach a topic in clear.

A keyed hash (HMAC-SHA256 with ``PIPELINE_ID_SALT``) keeps one address one id across
providers, so unique counts stay right, while nobody without the salt can reverse it or
test a guessed address against it.
"""

from __future__ import annotations

import hashlib
import hmac

PREFIX = "h:"


def looks_like_address(value: str) -> bool:
    return "@" in value


def pseudonymise(address: str, salt: bytes) -> str:
    """Return the keyed hash of an e-mail address (case and surrounding space ignored)."""
    normalised = address.strip().lower().encode("utf-8", "surrogatepass")
    return PREFIX + hmac.new(salt, normalised, hashlib.sha256).hexdigest()[:32]


def subscriber_id(value: str, salt: bytes) -> str:
    """Hash ``value`` when it is an address; opaque ids pass through unchanged."""
    return pseudonymise(value, salt) if looks_like_address(value) else value
