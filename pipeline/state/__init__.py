"""What is stored and how: the versioned formats and keys, bulk table access."""
