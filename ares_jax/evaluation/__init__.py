"""Evaluation of a policy: the benchmark judge (judge.py), scores (scores.py: avg@k, worst case over groups,
WeMath's four dimensions), report files (reports.py), benchmark runs (benchmarks.py) and the held-out
evaluation on the run's own data (held_out.py).

Nothing is imported here: the grading pool's spawned workers import `ares_jax.evaluation.judge` by name
and must not pull in JAX. Layering (docs/design.md §2.2): this package imports data, sampling, models and
sharding; stages import it, never the reverse.
"""
