"""Logical-axis sharding: the rules table, and the 8-device forward equal to the single-device one."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import hf_reference as R
from ares_jax import models
from ares_jax import sharding


def test_rules_drop_axes_that_do_not_divide():
  mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
  assert sharding.logical_to_spec(("embed", "q_heads", "head_dim"), (64, 4, 16), mesh) == P("fsdp", "tensor", None)
  # 2 KV heads cannot be split 4 ways: replicated instead of failing
  assert sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 2, 16), mesh) == P("fsdp", None, None)
  assert sharding.logical_to_spec(("activation_batch", None), (8, 3), sharding.make_mesh(2, 4, 1)) == \
      P(("data", "fsdp"), None)
  assert sharding.logical_to_spec(("activation_batch",), (2,), sharding.make_mesh(2, 4, 1)) == P("data")


def test_make_mesh_errors_name_the_sizes():
  with pytest.raises(ValueError, match="devices"):
    sharding.make_mesh(data=3, fsdp=3, tensor=1)
  assert sharding.make_mesh(data=2, fsdp=-1, tensor=1).shape == {"data": 2, "fsdp": 4, "tensor": 1}


@pytest.mark.parametrize("axes", [(1, 2, 4), (2, 1, 4), (2, 4, 1)])
def test_sharded_forward_equals_single_device(tmp_path, axes):
  assert jax.device_count() == 8, "tests/conftest.py simulates 8 CPU devices"
  path = R.save(R.hf_model(seed=3), str(tmp_path))
  config, params = models.load_hf(path)
  mesh = sharding.make_mesh(*axes)
  config8, params8 = models.load_hf(path, mesh=mesh)
  q = params8["decoder"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding.mesh.size == 8 and q.sharding.spec == sharding.logical_to_spec(
      ("layers", "embed", "q_heads", "head_dim"), q.shape, mesh)
  batch = R.build_batch([[3, "img", 4], [6, "img", 2]], R.random_images([(84, 112), (56, 56)]), "left")
  args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"])
  single = np.asarray(models.forward(config, params, *args))
  multi = np.asarray(models.forward(config8, params8, *args))
  np.testing.assert_allclose(multi, single, atol=1e-5, rtol=0)
