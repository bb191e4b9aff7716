"""Traffic with known ground truth (pipeline simulate) and the oracle that counts it."""
