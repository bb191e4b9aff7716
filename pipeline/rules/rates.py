"""Rate definitions (*What it computes* in ``pipeline/README.md``), as pure functions of counts.

A rate whose denominator is zero has no sample: it is ``None`` here and absent from
``/metrics``, never NaN or Inf. Each e-mail rate names its own numerator and denominator, so a
CTOR can only ever be built from unique clickers over unique openers.
"""

from __future__ import annotations

from collections.abc import Mapping

# rate -> (numerator count, denominator count); "delivered" is resolved by the setting.
ADS_RATES: dict[str, tuple[str, str]] = {
    "ctr": ("click", "impression"),
    "unique_ctr": ("unique_click", "impression"),
    "total_ctr": ("click", "impression"),
    "cvr": ("conversion", "click"),
}
EMAIL_RATES: dict[str, tuple[str, str]] = {
    "ctr": ("unique_click", "delivered"),
    "unique_ctr": ("unique_click", "delivered"),
    "total_ctr": ("click", "delivered"),
    "open_rate": ("unique_open", "delivered"),
    "human_open_rate": ("unique_human_open", "delivered"),
    "ctor": ("unique_click", "unique_open"),
    "human_ctor": ("unique_click", "unique_human_open"),
    "cvr": ("conversion", "click"),
}


def definitions(channel: str, email_denominator: str = "delivery") -> dict[str, tuple[str, str]]:
    if channel == "ads":
        return ADS_RATES
    return {
        rate: (num, email_denominator if den == "delivered" else den)
        for rate, (num, den) in EMAIL_RATES.items()
    }


def ratio(numerator: int, denominator: int) -> float | None:
    if denominator <= 0:
        return None
    return numerator / denominator


def compute_rates(
    channel: str,
    counts: Mapping[str, int],
    email_denominator: str = "delivery",
    unsupported: frozenset[str] = frozenset(),
) -> dict[str, float | None]:
    """Every rate of the channel; ``None`` where there is no sample or the source cannot tell."""
    return {
        rate: None if rate in unsupported else ratio(counts.get(num, 0), counts.get(den, 0))
        for rate, (num, den) in definitions(channel, email_denominator).items()
    }
