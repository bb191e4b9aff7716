"""How every Kafka client of a process connects: TLS, mutual TLS, SASL (PLAIN, SCRAM).

The ``PIPELINE_KAFKA_*`` settings (checked in :class:`~pipeline.settings.Settings`) become the
options aiokafka takes (:func:`client_options`: ``security_protocol``, ``sasl_mechanism``,
``sasl_plain_username``/``password``, ``ssl_context``) and the credentials object Faust takes
(:func:`faust_credentials`, which Faust turns into the same options for its consumer, producer
and admin client). Every client of the package is made with them: the stream stages (Faust),
the ingest producers, the admin client that declares topics, the end-offset reader, the bench.
TLS and SASL are aiokafka's; nothing here speaks either protocol.

A connection that fails is explained (:func:`explain`, :func:`check_connection`): which of
authentication, trust of the broker's certificate, its host name, the client key, the
mechanism, or a missing ACL it is, never with the password.
"""

from __future__ import annotations

import asyncio
import ssl
from functools import cache
from typing import Any

from aiokafka import errors as kafka_errors
from aiokafka.helpers import create_ssl_context

from pipeline.settings import Settings


class KafkaAccessError(RuntimeError):
    """The broker cannot be reached as configured; the message says why, without secrets."""


def client_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for any aiokafka client (producer, consumer, admin, client)."""
    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return {}
    options: dict[str, Any] = {"security_protocol": protocol}
    if protocol.endswith("SSL"):
        options["ssl_context"] = ssl_context(settings)
    if protocol.startswith("SASL_"):
        options.update(
            sasl_mechanism=settings.kafka_sasl_mechanism,
            sasl_plain_username=settings.kafka_sasl_username,
            sasl_plain_password=settings.kafka_sasl_password,
        )
    return options


def ssl_context(settings: Settings) -> ssl.SSLContext:
    """The TLS context: the CA file (else the system's trust store), the client certificate
    and key for mutual TLS; host names are checked."""
    return _ssl_context(
        str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None,
        str(settings.kafka_ssl_certfile) if settings.kafka_ssl_certfile else None,
        str(settings.kafka_ssl_keyfile) if settings.kafka_ssl_keyfile else None,
    )


@cache
def _ssl_context(cafile: str | None, certfile: str | None, keyfile: str | None) -> ssl.SSLContext:
    try:
        context = create_ssl_context(cafile=cafile, certfile=certfile, keyfile=keyfile)
    except ssl.SSLError as exc:
        which = "PIPELINE_KAFKA_SSL_CERTFILE/KEYFILE" if certfile else "PIPELINE_KAFKA_SSL_CAFILE"
        raise KafkaAccessError(f"{which} cannot be used: {exc.reason or exc}") from None
    except OSError as exc:
        raise KafkaAccessError(f"a PIPELINE_KAFKA_SSL_* file cannot be read: {exc.strerror}") from None
    return context


def faust_credentials(settings: Settings) -> Any:
    """What Faust's ``broker_credentials`` takes for these settings (None: plain TCP)."""
    import faust

    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return None
    if protocol == "SSL":
        return faust.SSLCredentials(ssl_context(settings))
    credentials = faust.SASLCredentials(
        username=settings.kafka_sasl_username,
        password=settings.kafka_sasl_password,
        mechanism=settings.kafka_sasl_mechanism,
        ssl_context=ssl_context(settings) if protocol == "SASL_SSL" else None,
    )
    return credentials


def describe(settings: Settings) -> str:
    """How this process connects, for logs: never the password."""
    protocol = settings.kafka_security_protocol
    parts = [protocol]
    if protocol.startswith("SASL_"):
        parts.append(f"{settings.kafka_sasl_mechanism} as {settings.kafka_sasl_username!r}")
    if protocol.endswith("SSL"):
        parts.append(f"CA {settings.kafka_ssl_cafile or 'the system trust store'}")
        if settings.kafka_ssl_certfile:
            parts.append(f"client certificate {settings.kafka_ssl_certfile}")
    return ", ".join(parts)


def explain(exc: BaseException, settings: Settings) -> str | None:
    """What a connection or request failure means for these settings, or None if it is not
    one of the security failures (the broker is down, a network error)."""
    who = (
        f"{settings.kafka_sasl_mechanism} as user {settings.kafka_sasl_username!r}"
        if settings.kafka_security_protocol.startswith("SASL_")
        else "the client certificate"
    )
    if isinstance(exc, ssl.SSLCertVerificationError):
        # OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH (62) for a name, X509_V_ERR_IP_ADDRESS_MISMATCH
        # (64, "IP address mismatch") for a broker reached by its address
        message = str(exc.verify_message or exc).lower()
        if exc.verify_code in (62, 64) or "hostname" in message or "ip address mismatch" in message:
            return (
                "the broker's certificate does not match the host name it was reached by "
                f"({exc.verify_message or exc}): use the name the certificate was issued for"
            )
        return (
            "the broker's certificate is not trusted "
            f"({exc.verify_message or exc}; CA: {settings.kafka_ssl_cafile or 'the system trust store'}): "
            "set PIPELINE_KAFKA_SSL_CAFILE to the CA that signed it"
        )
    if isinstance(exc, ssl.SSLError):
        text = str(exc).lower()
        if "certificate required" in text or ("alert" in text and settings.kafka_ssl_certfile is None):
            return (
                "the broker requires a client certificate (mutual TLS): "
                "set PIPELINE_KAFKA_SSL_CERTFILE and PIPELINE_KAFKA_SSL_KEYFILE"
            )
        return f"TLS with the broker failed ({exc.reason or exc}): does it listen with TLS on that port?"
    if isinstance(exc, kafka_errors.SaslAuthenticationFailed):
        return f"authentication failed ({who}): wrong user name or password"
    if isinstance(exc, kafka_errors.UnsupportedSaslMechanismError):
        return (
            f"the broker does not enable SASL mechanism {settings.kafka_sasl_mechanism} on this listener "
            f"({exc})"
        )
    if isinstance(exc, kafka_errors.IllegalSaslStateError):
        return f"SASL handshake refused ({exc}): does this listener take {settings.kafka_security_protocol}?"
    denied = _denied(exc)
    if denied:
        return denied
    return None


def _denied(exc: BaseException) -> str | None:
    """A missing ACL, named by operation and resource where the error says which."""
    for kind, what in (
        (kafka_errors.TopicAuthorizationFailedError, "on a topic"),
        (kafka_errors.GroupAuthorizationFailedError, "on the consumer group"),
        (kafka_errors.ClusterAuthorizationFailedError, "on the cluster"),
        (kafka_errors.TransactionalIdAuthorizationFailed, "on a transactional id"),
    ):
        if isinstance(exc, kind):
            return f"missing ACL {what}: {exc}"
    return None


async def check_connection(settings: Settings, timeout: float = 15.0) -> None:
    """Connect to the first reachable broker as configured and authenticate; raise
    :class:`KafkaAccessError` with the reason when the settings cannot work. A broker that is
    not reachable at all is not an error here (the worker waits for it, as without security)."""
    from pipeline.kafka.compat import connect_once

    options = client_options(settings)
    if not options:
        return
    for server in (settings.broker or "").split(","):
        host, _, port = server.rpartition(":")
        try:
            await asyncio.wait_for(connect_once(host, int(port), options), timeout)
            return
        except (TimeoutError, OSError, kafka_errors.KafkaError) as exc:
            reason = explain(exc, settings)
            if reason is not None:
                raise KafkaAccessError(f"Kafka at {server} ({describe(settings)}): {reason}") from None
    # nobody answered: the clients report it themselves as they retry, as without security


def run_check_connection(settings: Settings) -> None:
    """:func:`check_connection` on a loop of its own (a worker about to start)."""
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(check_connection(settings))
    finally:
        loop.close()
