"""PIPELINE_KAFKA_* settings: what is refused at start, what every client is given, and how a
failed connection is explained (without the password)."""

from __future__ import annotations

import ssl
from pathlib import Path

import faust
import pytest
from aiokafka import errors as kafka_errors

from pipeline.kafka import security
from pipeline.settings import Settings, SettingsError

SASL = {
    "PIPELINE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
    "PIPELINE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
    "PIPELINE_KAFKA_SASL_USERNAME": "worker",
    "PIPELINE_KAFKA_SASL_PASSWORD": "s3cret-pw",
}


def test_plain_tcp_by_default_gives_clients_nothing_extra():
    settings = Settings.from_env({})
    assert settings.kafka_security_protocol == "PLAINTEXT"
    assert security.client_options(settings) == {}
    assert security.faust_credentials(settings) is None


def test_sasl_ssl_gives_every_client_the_same_options_and_faust_its_credentials():
    settings = Settings.from_env(SASL)
    options = security.client_options(settings)
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (options["sasl_plain_username"], options["sasl_plain_password"]) == ("worker", "s3cret-pw")
    assert isinstance(options["ssl_context"], ssl.SSLContext)
    assert options["ssl_context"].check_hostname and options["ssl_context"].verify_mode == ssl.CERT_REQUIRED
    credentials = security.faust_credentials(settings)
    assert isinstance(credentials, faust.SASLCredentials)
    assert credentials.protocol.value == "SASL_SSL" and credentials.mechanism.value == "SCRAM-SHA-512"
    # what Faust's driver makes of them is what our own clients get
    from pipeline.kafka import compat

    app = faust.App("security-test", broker_credentials=credentials, autodiscover=False, web_enabled=False)
    mapped = compat.client_options_of(app)
    assert {k: mapped[k] for k in ("security_protocol", "sasl_mechanism", "sasl_plain_username")} == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "worker",
    }


def test_the_password_is_never_in_the_settings_repr_nor_the_description():
    settings = Settings.from_env(SASL)
    assert "s3cret-pw" not in repr(settings)
    assert "s3cret-pw" not in security.describe(settings)
    assert "worker" in security.describe(settings)


def test_the_password_comes_from_a_file_and_not_from_both(tmp_path: Path):
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    env = {**SASL, "PIPELINE_KAFKA_SASL_PASSWORD_FILE": str(secret)}
    with pytest.raises(
        SettingsError, match="PIPELINE_KAFKA_SASL_PASSWORD and PIPELINE_KAFKA_SASL_PASSWORD_FILE"
    ):
        Settings.from_env(env)
    del env["PIPELINE_KAFKA_SASL_PASSWORD"]
    assert Settings.from_env(env).kafka_sasl_password == "from-file"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"PIPELINE_KAFKA_SECURITY_PROTOCOL": "TLS"},
            "must be one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL",
        ),
        ({**SASL, "PIPELINE_KAFKA_SASL_MECHANISM": "GSSAPI"}, "PIPELINE_KAFKA_SASL_MECHANISM"),
        ({**SASL, "PIPELINE_KAFKA_SASL_PASSWORD": ""}, "PIPELINE_KAFKA_SASL_PASSWORD"),
        ({"PIPELINE_KAFKA_SASL_USERNAME": "worker"}, "SASL needs SASL_SSL"),
        (
            {"PIPELINE_KAFKA_SECURITY_PROTOCOL": "SSL", "PIPELINE_KAFKA_SSL_CERTFILE": "/etc/hostname"},
            "client key",
        ),
        (
            {"PIPELINE_KAFKA_SECURITY_PROTOCOL": "SSL", "PIPELINE_KAFKA_SSL_CAFILE": "/nonexistent.pem"},
            "not a readable",
        ),
        ({"PIPELINE_KAFKA_SSL_CAFILE": "/etc/hostname"}, "PROTOCOL is PLAINTEXT"),
    ],
)
def test_combinations_that_cannot_connect_are_refused_at_start(env, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)


def test_failures_are_explained_by_kind():
    settings = Settings.from_env(SASL)
    untrusted = ssl.SSLCertVerificationError(1, "certificate verify failed")
    untrusted.verify_code, untrusted.verify_message = 20, "unable to get local issuer certificate"
    assert "not trusted" in security.explain(untrusted, settings)
    mismatch = ssl.SSLCertVerificationError(1, "certificate verify failed")
    mismatch.verify_code, mismatch.verify_message = (
        62,
        "Hostname mismatch, certificate is not valid for '127.0.0.1'",
    )
    assert "does not match the host name" in security.explain(mismatch, settings)
    # what OpenSSL says for a broker reached by an IP address its certificate does not name
    mismatch.verify_code, mismatch.verify_message = (
        64,
        "IP address mismatch, certificate is not valid for '127.0.0.1'.",
    )
    assert "does not match the host name" in security.explain(mismatch, settings)
    denied = security.explain(kafka_errors.SaslAuthenticationFailed("Authentication failed"), settings)
    assert "authentication failed" in denied and "SCRAM-SHA-512 as user 'worker'" in denied
    assert "s3cret-pw" not in denied
    assert "does not enable SASL mechanism SCRAM-SHA-512" in security.explain(
        kafka_errors.UnsupportedSaslMechanismError("PLAIN"), settings
    )
    assert "missing ACL on the consumer group" in security.explain(
        kafka_errors.GroupAuthorizationFailedError(), settings
    )
    assert security.explain(ConnectionRefusedError(111, "refused"), settings) is None  # not a security matter


def test_an_unusable_client_key_is_said_at_start(tmp_path: Path):
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    cert.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    key.write_text("nope\n")
    settings = Settings.from_env(
        {
            "PIPELINE_KAFKA_SECURITY_PROTOCOL": "SSL",
            "PIPELINE_KAFKA_SSL_CERTFILE": str(cert),
            "PIPELINE_KAFKA_SSL_KEYFILE": str(key),
        }
    )
    with pytest.raises(security.KafkaAccessError, match="PIPELINE_KAFKA_SSL_CERTFILE/KEYFILE cannot be used"):
        security.client_options(settings)
