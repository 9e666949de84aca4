"""The tiny default shows ARES's entropy-difficulty law (docs/reproductions.md), checked on every CI run.

The whole `ares` pipeline of configs/tiny.py on one seed (the law table in docs/ runs three): on held-out
problems, AdaCS raises Spearman(response length, difficulty) over the warm-started base; AEPO then raises
the hardest level's accuracy and length and does not lengthen the easiest level's answers (by more than 1%,
`law.EASY_TOLERANCE`). This also
covers what tests/test_aepo_learning.py checked before the checks task: AEPO learns (the hardest level's
accuracy rises).
"""

from __future__ import annotations

import pytest

from ares_jax.reproductions import law
from ares_jax.stages import pipeline
from tiny_configs import load_config


@pytest.mark.slow
def test_tiny_ares_shows_the_entropy_difficulty_law(tmp_path):
  c = load_config("tiny.py")
  c.workdir = str(tmp_path)
  c.mesh.fsdp = 1  # one of the 8 simulated devices: 8 on a 2-core CPU would be ~5x slower
  # The law reads the last evaluation only; evaluations draw from their own key and problems, so fewer of
  # them leave training as the default runs it (CI time)
  c.eval.every = 30
  pipeline.run(c)
  evals = law.seed_evals(str(tmp_path))
  checks = law.law_checks(evals, [1, 2, 3])
  assert all(checks.values()), (checks, evals)
