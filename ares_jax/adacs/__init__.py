"""AdaCS (docs/design.md §6): difficulty-aware cold-start curation. The stage itself is `ares_jax.stages.adacs`."""

from ares_jax.adacs.selection import anchor_lengths, closest_candidate, select, target_length, water_fill

__all__ = ["anchor_lengths", "closest_candidate", "select", "target_length", "water_fill"]
