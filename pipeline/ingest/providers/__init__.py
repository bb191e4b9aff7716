"""E-mail-provider webhook adapters, one per ``POST /webhooks/<provider>``.

Each adapter is pure (no I/O except the SNS certificate fetch, which is injectable): the HTTP
layer calls ``verify`` (raises :class:`SignatureError`), then ``parse`` (raises
:class:`PayloadError`) and produces ``ParsedWebhook.events``. See README.md, Providers.
"""

from __future__ import annotations

from .brevo import ADAPTER as _brevo
from .common import (
    Adapter,
    ConfigError,
    ParsedWebhook,
    PayloadError,
    ReplayCache,
    SignatureError,
    UpstreamError,
    WebhookError,
    WebhookRequest,
)
from .mailgun import ADAPTER as _mailgun
from .mandrill import ADAPTER as _mandrill
from .postmark import ADAPTER as _postmark
from .sendgrid import ADAPTER as _sendgrid
from .ses import ADAPTER as _ses
from .sparkpost import ADAPTER as _sparkpost

ADAPTERS: dict[str, Adapter] = {
    a.name: a for a in (_sendgrid, _mailgun, _postmark, _ses, _mandrill, _sparkpost, _brevo)
}


def get(name: str) -> Adapter | None:
    """The adapter serving ``POST /webhooks/<name>``, or None (the HTTP layer answers 404)."""
    return ADAPTERS.get(name)


__all__ = [
    "ADAPTERS",
    "Adapter",
    "ConfigError",
    "ParsedWebhook",
    "PayloadError",
    "ReplayCache",
    "SignatureError",
    "UpstreamError",
    "WebhookError",
    "WebhookRequest",
    "get",
]
