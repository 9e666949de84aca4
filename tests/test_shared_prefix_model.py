"""ModelInputs.prefix: one row [prompt | r1 | r2] with shared-prefix attention gives the logits of the two
rows [prompt | r1] and [prompt | r2]."""

import jax
import numpy as np
import pytest
from flax import linen as nn

from ares_jax import models, settings as settings_lib
from ares_jax.models import blockwise_attention as BW
from ares_jax.models import qwen25vl
from ares_jax.models.qwen25vl import ModelInputs
from tiny_configs import load_config

P, R1, R2 = 6, 4, 5  # prompt and response lengths


@pytest.fixture(scope="module")
def tiny():
  """The tiny config's model in float32 with small random values (no initialiser to compile)."""
  mcfg = settings_lib.model(load_config("tiny.py").model).replace(dtype="float32", param_dtype="float32")
  rng = np.random.default_rng(0)
  shapes = nn.unbox(models.abstract_params(mcfg))
  return mcfg, jax.tree.map(lambda s: jax.numpy.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), shapes)


def _text(ids, mask, pos, prefix=None):
  positions = np.broadcast_to(np.asarray(pos, np.int32)[None], (3,) + np.shape(pos))
  return ModelInputs(np.asarray(ids, np.int32), positions, np.asarray(mask, np.int32), prefix=prefix)


@pytest.mark.parametrize("attention", ["xla", "blockwise"])
def test_shared_prompt_row_equals_separate_rows(tiny, attention, monkeypatch):
  mcfg, params = tiny
  mcfg = mcfg.replace(attention=attention)
  monkeypatch.setattr(BW, "DEFAULT_BLOCK", 4)  # several tiles, some skipped (read at trace time)
  rng = np.random.default_rng(1)
  prompt, r1, r2 = (rng.integers(1, 300, n) for n in (P, R1, R2))
  # packed: the prompt once (segment 1), r1 (2) and r2 (3) both with prefix 1, positions from P in each;
  # a second row without prefixes (-2) and right padding checks that other rows are untouched
  ids = [np.concatenate([prompt, r1, r2]), np.concatenate([prompt, r1, [0] * R2])]
  mask = [[1] * P + [2] * R1 + [3] * R2, [1] * (P + R1) + [0] * R2]
  pos = [list(range(P + R1)) + list(range(P, P + R2)), list(range(P + R1 + R2))]
  prefix = np.array([[-2] * P + [1] * (R1 + R2), [-2] * (P + R1 + R2)], np.int32)
  packed = np.asarray(qwen25vl._apply(mcfg, params, _text(ids, mask, pos, prefix)))
  # separate: [prompt | r1 | padding] and [prompt | r2]
  sep_ids = [np.concatenate([prompt, r1, [0]]), np.concatenate([prompt, r2])]
  sep = np.asarray(qwen25vl._apply(mcfg, params, _text(sep_ids, [[1] * (P + R1) + [0], [1] * (P + R2)],
                                                        [list(range(P + R1 + 1)), list(range(P + R2))])))
  assert np.abs(sep).max() > 1e-2  # logits that would show a difference
  np.testing.assert_allclose(packed[0, :P + R1], sep[0, :P + R1], atol=1e-5)
  np.testing.assert_allclose(packed[0, P + R1:], sep[1, P:], atol=1e-5)
  np.testing.assert_allclose(packed[1, :P + R1], sep[0, :P + R1], atol=1e-5)
  without = np.asarray(qwen25vl._apply(mcfg, params, _text(ids, mask, pos)))
  assert np.abs(without[0, P + R1:] - packed[0, P + R1:]).max() > 1e-3  # the prefix is what made it equal
