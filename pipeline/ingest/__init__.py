"""Ingest: turning requests into messages.

Validation and pseudonymisation (``service.py``), the producer, one adapter per provider
(``providers/``), and the ingest processes beside the stream worker.
"""
