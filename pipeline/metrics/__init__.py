"""Prometheus: collectors that read the processing state at scrape time."""
