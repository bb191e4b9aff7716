"""The Faust topology: the dedupe and aggregate stages and how they are wired."""
