"""Coverage-guided fuzzing (atheris / libFuzzer) of the ingest parsers and every webhook adapter.

Bounded run (the test suite does this): ``python tests/fuzz/fuzz_ingest.py -atheris_runs=20000``.
Longer run: ``python tests/fuzz/fuzz_ingest.py -max_total_time=3600 tests/fuzz/corpus``.
A crash is any exception other than the documented error types.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from pipeline.events import BodyError, EventError, parse_body, validate_event
    from pipeline.ingest.providers import ADAPTERS, WebhookError, WebhookRequest
    from pipeline.ingest.providers.ses import SesAdapter

ADAPTER_LIST = [
    *(a for name, a in sorted(ADAPTERS.items()) if name != "ses"),
    SesAdapter(cert_fetcher=lambda url: b"not a certificate"),
]
HEADER_NAMES = [
    "content-type",
    "authorization",
    "x-twilio-email-event-webhook-signature",
    "x-twilio-email-event-webhook-timestamp",
    "x-mandrill-signature",
    "x-amz-sns-message-type",
]
ENV = {
    "MAILGUN_WEBHOOK_SIGNING_KEY": "k",
    "MANDRILL_WEBHOOK_KEY": "k",
    "POSTMARK_WEBHOOK_USER": "u",
    "POSTMARK_WEBHOOK_PASSWORD": "p",
}


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    choice = fdp.ConsumeIntInRange(0, len(ADAPTER_LIST))
    if choice == len(ADAPTER_LIST):
        try:
            items = parse_body(fdp.ConsumeBytes(fdp.remaining_bytes()))
        except BodyError:
            return
        for item in items:
            try:
                validate_event(item, now=1_800_000_000, max_future_skew=300)
            except EventError:
                pass
        return
    adapter = ADAPTER_LIST[choice]
    headers = {
        HEADER_NAMES[fdp.ConsumeIntInRange(0, len(HEADER_NAMES) - 1)]: fdp.ConsumeUnicodeNoSurrogates(40)
        for _ in range(fdp.ConsumeIntInRange(0, 3))
    }
    request = WebhookRequest(
        body=fdp.ConsumeBytes(fdp.remaining_bytes()), headers=headers, url="http://127.0.0.1/webhooks/x"
    )
    env = ENV if fdp.ConsumeBool() else {}
    try:
        adapter.verify(request, env, 1_800_000_000.0)
    except WebhookError:
        pass
    try:
        adapter.parse(request, b"salt")
    except WebhookError:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
