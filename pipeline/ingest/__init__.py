"""Ingest: the canonical ``POST /events`` endpoint, provider webhooks, and the producer."""
