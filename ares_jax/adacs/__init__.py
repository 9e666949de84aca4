"""AdaCS (design.md 6): difficulty-aware cold-start curation. The SFT stage itself is not built yet."""

from ares_jax.adacs.selection import anchor_lengths, closest_candidate, select, target_length, water_fill

__all__ = ["anchor_lengths", "closest_candidate", "select", "target_length", "water_fill"]
