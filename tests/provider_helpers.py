"""What the webhook provider tests share: a fixed clock and salt, requests as the HTTP layer
hands them to an adapter, the credentials of each signature scheme (SendGrid's ECDSA key,
Mailgun's HMAC, the RSA key and self-signed certificate of SNS), the checks every mapped
event must pass, and the round trip through an adapter's own ``build_request``.

Keys and signatures are made here with ``cryptography`` and ``hmac`` directly, not with the
adapters' own signing code, so a mistake shared by an adapter's signing and verifying cannot
pass unseen; only :func:`round_trip` uses the adapter's ``build_request``, on purpose. Pure: no
broker, no network, so the unit suite uses it as well as the end-to-end tests.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

import orjson
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from pipeline.events import validate_event
from pipeline.ingest.identity import pseudonymise
from pipeline.ingest.providers import Adapter, WebhookRequest

SALT = b"test-salt"
NOW = 1_700_000_000.0  # the adapters' clock in the unit tests (2023-11-14T22:13:20Z)


def json_request(provider: str, doc: Any, headers: Mapping[str, str] | None = None) -> WebhookRequest:
    """A JSON body posted to ``/webhooks/<provider>``, headers as given (lower-case keys)."""
    return WebhookRequest(orjson.dumps(doc), dict(headers or {}), f"https://x.test/webhooks/{provider}")


def basic_auth(user: str, password: str) -> dict[str, str]:
    """The ``authorization`` header of HTTP basic authentication."""
    return {"authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def private_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> str:
    """A private key as the adapters' signing variables take it (PKCS#8 PEM)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def ecdsa_key() -> ec.EllipticCurvePrivateKey:
    """A P-256 key, the curve of SendGrid's signed Event Webhook."""
    return ec.generate_private_key(ec.SECP256R1())


def sendgrid_public_key(key: ec.EllipticCurvePrivateKey) -> str:
    """The public half as the SendGrid dashboard shows it: base64 of the DER SubjectPublicKeyInfo."""
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


def mailgun_signature(key: str, timestamp: str, token: str) -> str:
    """Mailgun's signature: hex HMAC-SHA256 of timestamp + token under the signing key."""
    return hmac.new(key.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()


def rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    """An RSA key for SNS signatures (the fuzz tests take a smaller one for speed)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def sns_certificate(key: rsa.RSAPrivateKey, valid_from: float, days: int, serial: int | None = None) -> bytes:
    """A self-signed PEM certificate standing in for the one SNS publishes at SigningCertURL,
    valid from ``valid_from`` (epoch seconds) for ``days``."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
    start = dt.datetime.fromtimestamp(valid_from, dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number() if serial is None else serial)
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def assert_email_event(event: dict[str, Any], source: str, address: str, now: float = NOW) -> None:
    """What every event an adapter maps must be: schema-valid at ``now``, on the e-mail
    channel, from ``source``, with the subscriber's address replaced by its pseudonym
    everywhere."""
    validate_event(event, now, 300)
    assert event["channel"] == "email" and event["source"] == source
    assert event["subscriber_id"] == pseudonymise(address, SALT)
    assert address not in orjson.dumps(event).decode()


def round_trip(
    adapter: Adapter,
    events: list[dict[str, Any]],
    env: Mapping[str, str],
    now: float = NOW,
    base_url: str = "",
    url: str = "",
) -> list[dict[str, Any]]:
    """Build the native request an adapter's provider would send for ``events``, hand it to the
    adapter as the HTTP layer does (header names lower-cased), verify it under ``env`` and
    return the events it parses."""
    headers, body = adapter.build_request(events, env, now, base_url)
    request = WebhookRequest(body, {name.lower(): value for name, value in headers.items()}, url)
    adapter.verify(request, env, now)
    return adapter.parse(request, SALT).events
