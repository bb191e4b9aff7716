"""Every knob in one place, read from the environment (``PIPELINE_*``) with CLI overrides.

Defaults are safe for a laptop: loopback only, the embedded broker, windows of 5m and 1h.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.credentials import CredentialsError, parse_endpoints, read_secret_files
from pipeline.state.codec import MAX_WINDOW_SIZES


class SettingsError(ValueError):
    """A setting has a value the pipeline cannot run with."""


def _duration(text: str) -> int:
    """Parse ``300``, ``300s``, ``5m``, ``1h``, ``2d`` into seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(float(text))
    except ValueError as exc:
        raise SettingsError(f"not a duration: {text!r}") from exc


_HOST_PORT = re.compile(r"(?P<host>[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?):(?P<port>[0-9]{1,5})")
BROKER_FORMS = (
    "host:port, a comma-separated list of them, or the same with kafka:// in front (kafka://k1:9092,k2:9092)"
)


def broker_servers(url: str) -> str:
    """The bootstrap list ``host:port,host:port`` of a broker URL, or :class:`SettingsError`.

    Accepted: ``host:port``, a comma-separated list of them, and either with Faust's
    ``kafka://`` in front of the list or of each item. Anything else (another scheme, a path,
    a missing port) would otherwise surface much later as a worker that cannot bootstrap.
    """
    servers = []
    for raw in url.split(","):
        item = raw.strip()
        if item[:8].lower() == "kafka://":
            item = item[8:]
        item = item.removesuffix("/")
        match = _HOST_PORT.fullmatch(item)
        if match is None or not 0 < int(match["port"]) < 65536:
            shown = "<credentials>@" + item.rsplit("@", 1)[1] if "@" in item else item
            scheme = item.split("://", 1)[0] if "://" in item else None
            if scheme is not None and scheme.lower() == "kafka":
                problem = "kafka:// is given twice"
            elif scheme is not None:
                problem = f"scheme {scheme!r} is not supported (plain TCP, kafka:// only)"
            elif not item:
                problem = "an entry is empty"
            else:
                problem = f"{shown!r} is not host:port"
            raise SettingsError(f"broker URL (PIPELINE_BROKER, --broker): {problem}; expected {BROKER_FORMS}")
        servers.append(item)
    return ",".join(servers)


def _process_count(text: str) -> int | None:
    """``auto`` (None: chosen from the CPUs) or a number of processes, 0 or more."""
    if text.strip().lower() in ("", "auto"):
        return None
    try:
        count = int(text)
    except ValueError:
        count = -1
    if count < 0:
        raise SettingsError(f"PIPELINE_INGEST_PROCESSES must be auto or a whole number >= 0, not {text!r}")
    return count


KAFKA_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
KAFKA_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def window_label(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@dataclass(frozen=True)
class Settings:
    broker: str | None = None  # host:port,... (see broker_servers); None = start the embedded broker
    port: int = 8080
    host: str = "127.0.0.1"
    partitions: int = 4
    replication: int = 1
    idempotent_producer: bool = True  # falls back when the broker rejects InitProducerId (Tansu)
    data_dir: Path = Path("./data")
    app_id: str = "funnel"
    store: str = "rocksdb://"
    windows: tuple[int, ...] = (300, 3600)
    allowed_lateness: int = 300
    window_retention: int = 24  # windows of each size kept per campaign; older ones are closed
    dedupe_retention: int = 48 * 3600
    max_future_skew: int = 300
    bot_click_seconds: float = 2.0  # an e-mail click this soon after its delivery is a scanner's
    email_denominator: str = "delivery"  # or "send" for providers that report no deliveries
    max_campaigns: int = 1000
    max_body_bytes: int = 5 * 1024 * 1024
    max_events_per_request: int = 10_000
    max_in_flight_events: int = 200_000  # waiting for broker acks; beyond it ingest answers 503
    # ingest processes beside the stream worker (0: ingest in the worker's own process);
    # None: chosen from the CPUs (pipeline.ingest.processes.ingest_process_count)
    ingest_processes: int | None = None
    # secrets: kept out of repr so that logging a Settings never shows them
    ingest_token: str | None = field(default=None, repr=False)
    id_salt: bytes = field(default=b"", repr=False)
    # listeners: with an admin port, /metrics, /campaigns and /health move there and the public
    # port serves only the ingest endpoints and /livez
    admin_host: str = "127.0.0.1"
    admin_port: int | None = None
    tls_cert: Path | None = None  # both set: the public listener speaks HTTPS
    tls_key: Path | None = None
    header_timeout: float = 15.0  # a request head must arrive within it; idle keep-alive closes after it
    endpoints: frozenset[str] | None = None  # public ingest endpoints served; None = all of them
    allow_unauthenticated: frozenset[str] = frozenset()  # endpoints deliberately open beyond loopback
    batch_max: int = 2000
    batch_within: float = 0.05
    events_per_message: int = 1000
    send_timeout: float = 10.0
    # how every client of this process connects to Kafka (pipeline.kafka.security)
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: str | None = field(default=None, repr=False)
    kafka_ssl_cafile: Path | None = None  # None: the system's trust store
    kafka_ssl_certfile: Path | None = None  # with the key: mutual TLS
    kafka_ssl_keyfile: Path | None = None
    env: Mapping[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.broker is not None:  # every way in (environment, --broker, replace()) is checked
            object.__setattr__(self, "broker", broker_servers(self.broker))

    @property
    def window_labels(self) -> dict[int, str]:
        return {size: window_label(size) for size in self.windows}

    def with_overrides(self, **overrides: Any) -> Settings:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        try:
            return cls._from_env(read_secret_files(os.environ if env is None else env))
        except CredentialsError as exc:
            raise SettingsError(str(exc)) from None

    @classmethod
    def _from_env(cls, env: dict[str, str]) -> Settings:
        get = env.get
        windows = tuple(
            sorted({_duration(w) for w in get("PIPELINE_WINDOWS", "5m,1h").split(",") if w.strip()})
        )
        denominator = get("PIPELINE_EMAIL_DENOMINATOR", "delivery")
        if denominator not in ("delivery", "send"):
            raise SettingsError("PIPELINE_EMAIL_DENOMINATOR must be 'delivery' or 'send'")
        salt = get("PIPELINE_ID_SALT", "")
        settings = cls(
            broker=get("PIPELINE_BROKER") or None,
            port=int(get("PIPELINE_PORT", "8080")),
            host=get("PIPELINE_HOST", "127.0.0.1"),
            partitions=int(get("PIPELINE_PARTITIONS", "4")),
            replication=int(get("PIPELINE_REPLICATION", "1")),
            idempotent_producer=get("PIPELINE_IDEMPOTENT_PRODUCER", "true").lower() == "true",
            data_dir=Path(get("PIPELINE_DATA_DIR", "./data")),
            app_id=get("PIPELINE_APP_ID", "funnel"),
            store=get("PIPELINE_STORE", "rocksdb://"),
            windows=windows,
            allowed_lateness=_duration(get("PIPELINE_ALLOWED_LATENESS", "5m")),
            window_retention=int(get("PIPELINE_WINDOW_RETENTION", "24")),
            dedupe_retention=_duration(get("PIPELINE_DEDUPE_RETENTION", "48h")),
            max_future_skew=_duration(get("PIPELINE_MAX_FUTURE_SKEW", "5m")),
            bot_click_seconds=float(get("PIPELINE_BOT_CLICK_SECONDS", "2")),
            email_denominator=denominator,
            max_campaigns=int(get("PIPELINE_MAX_CAMPAIGNS", "1000")),
            max_body_bytes=int(get("PIPELINE_MAX_BODY_BYTES", str(5 * 1024 * 1024))),
            ingest_token=get("PIPELINE_INGEST_TOKEN") or None,
            id_salt=salt.encode(),
            batch_max=int(get("PIPELINE_BATCH_MAX", "2000")),
            batch_within=float(get("PIPELINE_BATCH_WITHIN", "0.05")),
            send_timeout=float(get("PIPELINE_SEND_TIMEOUT", "10")),
            max_in_flight_events=int(get("PIPELINE_MAX_IN_FLIGHT_EVENTS", "200000")),
            ingest_processes=_process_count(get("PIPELINE_INGEST_PROCESSES", "auto")),
            admin_host=get("PIPELINE_ADMIN_HOST") or "127.0.0.1",
            admin_port=int(get("PIPELINE_ADMIN_PORT")) if get("PIPELINE_ADMIN_PORT") else None,
            tls_cert=Path(get("PIPELINE_TLS_CERT")) if get("PIPELINE_TLS_CERT") else None,
            tls_key=Path(get("PIPELINE_TLS_KEY")) if get("PIPELINE_TLS_KEY") else None,
            header_timeout=_duration(get("PIPELINE_HEADER_TIMEOUT", "15s")),
            endpoints=(
                parse_endpoints(get("PIPELINE_ENDPOINTS", ""), "PIPELINE_ENDPOINTS")
                if get("PIPELINE_ENDPOINTS") is not None
                else None
            ),
            allow_unauthenticated=parse_endpoints(
                get("PIPELINE_ALLOW_UNAUTHENTICATED", ""), "PIPELINE_ALLOW_UNAUTHENTICATED"
            ),
            kafka_security_protocol=(get("PIPELINE_KAFKA_SECURITY_PROTOCOL") or "PLAINTEXT").upper(),
            kafka_sasl_mechanism=(get("PIPELINE_KAFKA_SASL_MECHANISM") or "").upper() or None,
            kafka_sasl_username=get("PIPELINE_KAFKA_SASL_USERNAME") or None,
            kafka_sasl_password=get("PIPELINE_KAFKA_SASL_PASSWORD") or None,
            kafka_ssl_cafile=_path(get("PIPELINE_KAFKA_SSL_CAFILE")),
            kafka_ssl_certfile=_path(get("PIPELINE_KAFKA_SSL_CERTFILE")),
            kafka_ssl_keyfile=_path(get("PIPELINE_KAFKA_SSL_KEYFILE")),
            env=env,
        )
        settings.check()
        return settings

    def check(self) -> None:
        if self.dedupe_retention < 48 * 3600:
            raise SettingsError("PIPELINE_DEDUPE_RETENTION must be at least 48h (providers retry 24h)")
        if not self.windows or min(self.windows) < 60:
            raise SettingsError("PIPELINE_WINDOWS needs at least one window of 1m or more")
        if len(set(self.windows)) > MAX_WINDOW_SIZES:
            raise SettingsError(f"PIPELINE_WINDOWS takes at most {MAX_WINDOW_SIZES} window sizes")
        if self.partitions < 1:
            raise SettingsError("PIPELINE_PARTITIONS must be positive")
        if self.header_timeout < 1:
            raise SettingsError("PIPELINE_HEADER_TIMEOUT must be at least 1s")
        self._check_kafka_security()

    def _check_kafka_security(self) -> None:
        """Every PIPELINE_KAFKA_* combination that cannot connect is refused at start, by name."""
        protocol, mechanism = self.kafka_security_protocol, self.kafka_sasl_mechanism
        if protocol not in KAFKA_SECURITY_PROTOCOLS:
            raise SettingsError(
                f"PIPELINE_KAFKA_SECURITY_PROTOCOL must be one of {', '.join(KAFKA_SECURITY_PROTOCOLS)}, "
                f"not {protocol!r}"
            )
        if protocol.startswith("SASL_"):
            if mechanism not in KAFKA_SASL_MECHANISMS:
                raise SettingsError(
                    f"PIPELINE_KAFKA_SECURITY_PROTOCOL={protocol} needs PIPELINE_KAFKA_SASL_MECHANISM, "
                    f"one of {', '.join(KAFKA_SASL_MECHANISMS)} (not {mechanism or 'unset'})"
                )
            missing = [
                name
                for name, value in (
                    ("PIPELINE_KAFKA_SASL_USERNAME", self.kafka_sasl_username),
                    ("PIPELINE_KAFKA_SASL_PASSWORD (or _FILE)", self.kafka_sasl_password),
                )
                if not value
            ]
            if missing:
                raise SettingsError(
                    f"PIPELINE_KAFKA_SECURITY_PROTOCOL={protocol} needs {' and '.join(missing)}"
                )
        elif mechanism or self.kafka_sasl_username or self.kafka_sasl_password:
            raise SettingsError(
                f"PIPELINE_KAFKA_SASL_* is set but PIPELINE_KAFKA_SECURITY_PROTOCOL is {protocol}: "
                "SASL needs SASL_SSL (or SASL_PLAINTEXT)"
            )
        files = {
            "PIPELINE_KAFKA_SSL_CAFILE": self.kafka_ssl_cafile,
            "PIPELINE_KAFKA_SSL_CERTFILE": self.kafka_ssl_certfile,
            "PIPELINE_KAFKA_SSL_KEYFILE": self.kafka_ssl_keyfile,
        }
        given = [name for name, path in files.items() if path is not None]
        if given and not protocol.endswith("SSL"):
            raise SettingsError(f"{', '.join(given)} set but PIPELINE_KAFKA_SECURITY_PROTOCOL is {protocol}")
        if (self.kafka_ssl_certfile is None) != (self.kafka_ssl_keyfile is None):
            lacking = "the client key" if self.kafka_ssl_keyfile is None else "the client certificate"
            raise SettingsError(
                "mutual TLS needs both PIPELINE_KAFKA_SSL_CERTFILE and PIPELINE_KAFKA_SSL_KEYFILE "
                f"({lacking} is missing)"
            )
        for name, path in files.items():
            if path is not None and not path.is_file():
                raise SettingsError(f"{name}={path} is not a readable file")
