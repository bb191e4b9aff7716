"""What a worker may expose, and the secrets it must have before it does.

Bound to loopback (a laptop, ``pipeline run``) nothing is demanded: only this machine can reach
the port. Bound to any other address, a worker refuses to start unless

* every public endpoint it serves authenticates its callers (``POST /events`` a bearer token,
  each ``POST /webhooks/<provider>`` that provider's signature or credentials), or is named in
  ``PIPELINE_ALLOW_UNAUTHENTICATED`` (deliberately open), or is left out of
  ``PIPELINE_ENDPOINTS`` (not served);
* the ID salt (the key of the hash that replaces e-mail addresses) is set and long enough to be
  a secret: with an empty or short key anyone can test a guessed address against a hash.

Every problem is collected and named in one message, so one start tells the operator everything
that is missing. Secrets may come from files (``NAME_FILE``), as Kubernetes and compose secrets
are mounted; their values are never logged.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import socket
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.credentials import EVENTS, endpoint_names, provider_credentials
from pipeline.settings import SettingsError

if TYPE_CHECKING:
    from pipeline.settings import Settings

log = logging.getLogger(__name__)

MIN_SALT_LENGTH = 32  # characters: 32 hex digits are 128 bits (`openssl rand -hex 32` gives 64)
SALT_FILE_NAME = "id-salt"  # where `pipeline run` keeps the salt it generated, in its data directory


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the port reachable from this machine only.

    An empty host binds every interface. A name counts as loopback only if every address it
    resolves to is a loopback address.
    """
    host = host.strip().strip("[]")
    if not host:
        return False
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None)
        except OSError:
            return False
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    if not addresses:
        return False
    for address in addresses:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if not address.is_loopback:
            return False
    return True


def served_endpoints(settings: Settings) -> frozenset[str]:
    return settings.endpoints if settings.endpoints is not None else frozenset(endpoint_names())


def exposure_problems(settings: Settings) -> list[str]:
    """What a worker bound beyond loopback lacks, one line per missing setting (empty: none)."""
    problems: list[str] = []
    salt = settings.id_salt
    if not salt:
        problems.append(
            "PIPELINE_ID_SALT (or PIPELINE_ID_SALT_FILE) is not set: e-mail addresses would be "
            f"hashed with an empty key, which anyone can test a guessed address against; set a "
            f"random value of at least {MIN_SALT_LENGTH} characters (`openssl rand -hex 32`), the "
            "same on every worker"
        )
    elif len(salt) < MIN_SALT_LENGTH:
        problems.append(
            f"PIPELINE_ID_SALT (or PIPELINE_ID_SALT_FILE) has {len(salt)} characters: at least "
            f"{MIN_SALT_LENGTH} are needed to be a secret (`openssl rand -hex 32`)"
        )
    served = served_endpoints(settings)
    allowed = settings.allow_unauthenticated
    alternatives = (
        "name `{0}` in PIPELINE_ALLOW_UNAUTHENTICATED to {1}, or leave `{0}` out of PIPELINE_ENDPOINTS"
    )
    if EVENTS in served and EVENTS not in allowed and not settings.ingest_token:
        problems.append(
            "POST /events: set PIPELINE_INGEST_TOKEN (or PIPELINE_INGEST_TOKEN_FILE), or "
            + alternatives.format(EVENTS, "take events from anyone who reaches the port")
        )
    for name, variables in provider_credentials().items():
        if name not in served or name in allowed:
            continue
        if any(settings.env.get(v, "").strip() for v in variables):
            continue
        wanted = " or ".join(variables)
        problems.append(
            f"POST /webhooks/{name}: set {wanted} (or the same name with _FILE), or "
            + alternatives.format(name, "accept unsigned requests")
        )
    return problems


def check_listeners(settings: Settings) -> None:
    """Refuse a start whose listeners would be unsafe or cannot work; one message for all of it."""
    problems: list[str] = []
    if settings.admin_port is not None and settings.admin_port == settings.port:
        problems.append(f"PIPELINE_ADMIN_PORT must differ from PIPELINE_PORT ({settings.port})")
    if bool(settings.tls_cert) != bool(settings.tls_key):
        problems.append("PIPELINE_TLS_CERT and PIPELINE_TLS_KEY go together: set both or neither")
    elif settings.tls_cert and settings.tls_key:
        try:
            tls_context(settings)
        except (OSError, ssl.SSLError) as exc:
            problems.append(f"PIPELINE_TLS_CERT / PIPELINE_TLS_KEY cannot be loaded: {exc}")
    if problems:
        raise SettingsError("\n".join(problems))
    if is_loopback(settings.host):
        return
    missing = exposure_problems(settings)
    if missing:
        raise SettingsError(
            f"refusing to serve on {settings.host}:{settings.port}, which is reachable beyond this "
            "machine, without these settings:\n"
            + "\n".join(f"  - {p}" for p in missing)
            + "\n(on loopback none of them is required; see deploy/README.md, Security)"
        )


def open_endpoints(settings: Settings) -> list[str]:
    """Served endpoints that take requests nobody authenticated, as their paths."""
    served = served_endpoints(settings)
    paths = ["POST /events"] if EVENTS in served and not settings.ingest_token else []
    for name, variables in provider_credentials().items():
        if name in served and not any(settings.env.get(v, "").strip() for v in variables):
            paths.append(f"POST /webhooks/{name}")
    return paths


def warn_open_endpoints(settings: Settings) -> None:
    """Say loudly, at start, which served endpoints take requests nobody authenticated."""
    paths = open_endpoints(settings)
    if paths and is_loopback(settings.host):
        log.warning(
            "NO CREDENTIALS for %s: they accept unauthenticated requests (loopback only, so from this "
            "machine only; see README.md, Providers and Configuration)",
            ", ".join(paths),
        )
    else:
        for path in paths:  # named in PIPELINE_ALLOW_UNAUTHENTICATED: the check let them through
            log.warning(
                "%s HAS NO CREDENTIALS: it accepts requests from anyone who reaches %s:%s "
                "(named in PIPELINE_ALLOW_UNAUTHENTICATED)",
                path,
                settings.host,
                settings.port,
            )
    if not settings.id_salt:
        log.warning(
            "PIPELINE_ID_SALT is not set: e-mail addresses are hashed with an empty key (fine on a "
            "laptop with test data; set it before real addresses arrive, and never change it after)"
        )


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The public listener's TLS context, or None for plain HTTP."""
    if not (settings.tls_cert and settings.tls_key):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    return context


def load_or_create_salt(data_dir: Path) -> bytes:
    """The ID salt kept in ``data_dir`` (made once, mode 0600), so a restart hashes the same.

    For ``pipeline run``: one process, one data directory. A deployment of several workers must
    share one salt, so workers take it from PIPELINE_ID_SALT or PIPELINE_ID_SALT_FILE instead.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / SALT_FILE_NAME
    if not path.exists():
        if any(data_dir.iterdir()):
            log.warning(
                "%s has data but no %s: a new salt is generated, so addresses seen before this start "
                "(hashed with the key of that time) do not merge with the same addresses from now on",
                data_dir,
                SALT_FILE_NAME,
            )
        # written aside, then linked into place: a crash never leaves a half-written salt, and
        # of two processes starting at once both end up with whichever salt was linked first
        draft = data_dir / f".{SALT_FILE_NAME}.{os.getpid()}"
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, (secrets.token_hex(32) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(draft, path)
            log.info("generated the ID salt in %s (keep it with the data; never change it)", path)
        except FileExistsError:
            pass
        finally:
            draft.unlink()
        dir_fd = os.open(data_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    if path.stat().st_mode & 0o077:
        log.warning("%s can be read by other users: `chmod 600 %s`", path, path)
    salt = path.read_text(encoding="utf-8").strip()
    if len(salt) < MIN_SALT_LENGTH:
        raise SettingsError(
            f"{path} holds no usable salt (fewer than {MIN_SALT_LENGTH} characters); restore it, or "
            "remove it only if no hashed data in this directory matters"
        )
    return salt.encode()
