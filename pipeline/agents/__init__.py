"""Faust agents: ``dedupe`` (keyed by subscriber) feeds ``aggregate`` (keyed by campaign)."""
