"""Training machinery: optimizer, train state, updates, SFT, sequences for scoring, checkpoints, metrics."""
