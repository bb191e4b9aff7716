"""Pure funnel rules, free of I/O: redelivery and uniqueness, combining partitions, rates."""
