"""Where a funnel is clogged: diagnosis, published benchmarks, the report command."""
