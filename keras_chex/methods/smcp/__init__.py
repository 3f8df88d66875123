"""SMCP: soft-masking channel pruning under a cost budget."""
