"""Streaming funnel rates from ad-server and e-mail-provider events."""

__version__ = "0.1.0"
