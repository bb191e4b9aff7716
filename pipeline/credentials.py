"""Which variables hold credentials, and reading them from files (``NAME_FILE``).

Kubernetes and compose mount secrets as files; every credential variable may be given as
``NAME_FILE``, a path whose content is the value. Endpoint names (``events`` and one per
provider) are what ``PIPELINE_ENDPOINTS`` and ``PIPELINE_ALLOW_UNAUTHENTICATED`` list. The
variables' names are the providers' own (each adapter declares the ones it reads).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pipeline.ingest.providers import brevo, mailgun, mandrill, postmark, sendgrid, ses, sparkpost


class CredentialsError(ValueError):
    """A secret file that cannot be used, or an endpoint name nobody serves."""


EVENTS = "events"  # the name of ``POST /events`` in PIPELINE_ENDPOINTS / PIPELINE_ALLOW_UNAUTHENTICATED
PIPELINE_SECRETS = ("PIPELINE_INGEST_TOKEN", "PIPELINE_ID_SALT", "PIPELINE_KAFKA_SASL_PASSWORD")


def provider_credentials() -> dict[str, tuple[str, ...]]:
    """Per webhook endpoint, the secrets that authenticate it: any one of them set is enough.

    A user name alone is not a secret (the password next to it is), so it does not count here.
    """
    return {
        sendgrid.NAME: (sendgrid.KEY_ENV,),
        mailgun.NAME: (mailgun.KEY_ENV,),
        postmark.NAME: (postmark.PASSWORD_ENV,),
        # SNS messages are always signature-checked; the allow-list of topics is what keeps out
        # messages signed for somebody else's topic
        ses.NAME: (ses.TOPICS_ENV,),
        mandrill.NAME: (mandrill.KEY_ENV,),
        sparkpost.NAME: (sparkpost.TOKEN_ENV, sparkpost.PASSWORD_ENV),
        brevo.NAME: (brevo.TOKEN_ENV, brevo.PASSWORD_ENV),
    }


def provider_users() -> tuple[str, ...]:
    return (postmark.USER_ENV, sparkpost.USER_ENV, brevo.USER_ENV)


def endpoint_names() -> tuple[str, ...]:
    """Every public ingest endpoint by name: ``events`` and one per provider."""
    return (EVENTS, *provider_credentials())


def secret_variables() -> tuple[str, ...]:
    """Variables that may be given as ``NAME_FILE`` (a path whose content is the value)."""
    names = [*PIPELINE_SECRETS, *provider_users()]
    for variables in provider_credentials().values():
        names += [v for v in variables if v not in names]
    return tuple(names)


def read_secret_files(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with every ``NAME_FILE`` replaced by ``NAME`` = the file's content (stripped).

    A file that cannot be read, is empty, or is set next to its plain variable stops the start;
    the message names the variable and the path, never the content.
    """
    resolved = dict(env)
    problems: list[str] = []
    for name in secret_variables():
        path = env.get(f"{name}_FILE", "")
        if not path:
            continue
        if env.get(name):
            problems.append(f"{name} and {name}_FILE are both set: keep one")
            continue
        try:
            value = Path(path).read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            problems.append(f"{name}_FILE={path} is not UTF-8 text")
            continue
        except OSError as exc:
            problems.append(f"{name}_FILE={path} cannot be read ({exc.strerror or exc.__class__.__name__})")
            continue
        if not value:
            problems.append(f"{name}_FILE={path} is empty")
            continue
        resolved[name] = value
    if problems:
        raise CredentialsError("secret files unusable:\n" + "\n".join(f"  - {p}" for p in problems))
    return resolved


def parse_endpoints(value: str, variable: str) -> frozenset[str]:
    names = frozenset(n.strip().lower() for n in value.split(",") if n.strip())
    known = endpoint_names()
    unknown = sorted(names - set(known))
    if unknown:
        raise CredentialsError(
            f"{variable}: unknown endpoint {', '.join(unknown)} (known: {', '.join(known)})"
        )
    return names
