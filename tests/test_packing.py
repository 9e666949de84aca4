"""train/packing.py: the three update-row layouts hold the same tokens at the same positions, and give the same
log-probs, losses and gradients (AEPO and SFT, with an image prompt and a video prompt, with LoRA, on 1 and 8 devices)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ares_jax import models, sharding
from ares_jax import settings as settings_lib
from ares_jax.aepo import step as aepo_step
from ares_jax.data.batching import Prompt
from ares_jax.models import blockwise_attention, lora
from ares_jax.train import packing, row_fill, sft
from ares_jax.train import optimizer as optim_lib
from ares_jax.train.update import Updater
from tiny_configs import load_config

WIDTH = 24
GROUP = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
LENGTHS = [5, 17, 9, 12, 3, 20, 7, 14, 11]
LAYOUTS = {
    "none": packing.PackingSettings(packing="none", micro_batch_size=4),
    "packed": packing.PackingSettings(packing="packed", row_tokens=64, tokens_per_micro_batch=128),
    "shared_prompt": packing.PackingSettings(packing="shared_prompt", row_tokens=64, tokens_per_micro_batch=128),
}


@functools.lru_cache(maxsize=None)
def _model(adapters: bool = False):
  mcfg = settings_lib.model(load_config("tiny.py").model)
  if adapters:
    mcfg = mcfg.replace(lora=lora.LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "down")))
  params = models.init_params(mcfg, jax.random.key(0))
  if adapters:  # B != 0: the adapters change the function
    keys = iter(jax.random.split(jax.random.key(5), 64))
    trained = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(next(keys), a.shape, a.dtype),
                           models.init_adapters(mcfg, jax.random.key(1)))
    params = lora.with_adapters(lora.frozen_base(mcfg, params), trained)
  return mcfg, params


def _prompts(mcfg):
  """A text prompt, one with an image (a 4 x 4 patch grid: 4 merged tokens) and one with a video (2 temporal
  patches of 4 x 4: 8 merged tokens, 1.5 s apart)."""
  rng = np.random.default_rng(0)
  text = lambda n: rng.integers(5, 300, n).astype(np.int32)
  run = lambda token, n: np.concatenate([[mcfg.vision_start_token_id], [token] * n, [mcfg.vision_end_token_id]])
  pixels = lambda n: rng.normal(size=(n, mcfg.vision.patch_dim)).astype(np.float32)
  image = Prompt(np.concatenate([text(3), run(mcfg.image_token_id, 4), text(10)]).astype(np.int32), pixels(16),
                 np.array([[1, 4, 4]]))
  video = Prompt(np.concatenate([text(11), run(mcfg.video_token_id, 8), text(12)]).astype(np.int32),
                 pixel_values_videos=pixels(32), video_grid_thw=np.array([[2, 4, 4]]),
                 second_per_grid_ts=np.array([1.5], np.float32))
  return [Prompt(text(20)), image, video]


def _rows(mcfg, layout, seed=0):
  rng = np.random.default_rng(seed)
  responses = [rng.integers(5, 300, n).astype(np.int32) for n in LENGTHS]
  mask = np.zeros((len(LENGTHS), WIDTH), bool)
  for i, n in enumerate(LENGTHS):
    mask[i, min(i, n - 1):n] = True  # some start later (a branch trains from its fork)
  return aepo_step.UpdateRows(mcfg, _prompts(mcfg), GROUP, responses, rng.normal(size=len(LENGTHS)).astype(np.float32),
                              mask, rng.uniform(0, 0.1, (len(LENGTHS), WIDTH)).astype(np.float32), LAYOUTS[layout],
                              WIDTH, 0)


@pytest.mark.parametrize("layout", ["none", "packed", "shared_prompt"])
def test_every_response_token_sits_once_after_what_precedes_it(layout):
  mcfg, _ = _model()
  rows = _rows(mcfg, layout)
  seen = np.zeros((len(rows), WIDTH), int)
  for r in rows.layout(range(len(rows))):
    b, t = r.inputs.ids.shape
    assert b & (b - 1) == 0 and b <= LAYOUTS[layout].rows_per_micro_batch
    assert (layout == "shared_prompt") == (r.inputs.prefix is not None)
    for row, col in zip(*np.nonzero(r.scored)):
      i, j = r.seq[row, col], r.col[row, col]
      seen[i, j] += 1
      prompt = rows.prompts[GROUP[i]]
      assert r.inputs.ids[row, col] == rows.responses[i][j]
      before = rows.responses[i][j - 1] if j else prompt.ids[-1]
      assert r.inputs.ids[row, r.src[row, col]] == before
      assert j == 0 or r.src[row, col] == col - 1
      _, start = packing.prompt_positions(mcfg, prompt)
      np.testing.assert_array_equal(r.inputs.positions[:, row, col], start + j)
      if layout == "shared_prompt" and j == 0:  # its own segment, which also sees the prompt copy it follows
        assert r.inputs.mask[row, col] != r.inputs.mask[row, r.src[row, col]]
        assert r.inputs.prefix[row, col] == r.inputs.mask[row, r.src[row, col]]
      elif layout == "shared_prompt":
        assert r.inputs.prefix[row, col] == r.inputs.prefix[row, col - 1]
  np.testing.assert_array_equal(seen, np.arange(WIDTH)[None] < np.array(LENGTHS)[:, None])


def test_shared_prompts_are_computed_once_per_row_and_groups_split_at_the_row_length():
  mcfg, _ = _model()
  counts = {}
  for layout in LAYOUTS:
    micro = _rows(mcfg, layout).layout(range(len(GROUP)))
    counts[layout] = sum(r.tokens()[0] for r in micro), sum(r.tokens()[1] for r in micro)
    if layout == "shared_prompt":
      image_rows = sum(int((r.inputs.ids == mcfg.image_token_id).sum()) // 4 for r in micro)
      assert image_rows == 1  # group 1 (the image prompt) fits one row: the vision tower sees its image once
  assert counts["none"][1] == counts["packed"][1] == counts["shared_prompt"][1] == sum(LENGTHS)
  assert counts["shared_prompt"][0] < counts["packed"][0] < counts["none"][0]


def test_a_sequence_longer_than_a_row_names_the_field():
  mcfg, _ = _model()
  rows = _rows(mcfg, "packed")
  rows.packing = packing.PackingSettings(packing="packed", row_tokens=32, tokens_per_micro_batch=64)
  with pytest.raises(ValueError, match="config.updates.row_tokens=32"):
    rows.layout(range(len(rows)))
  with pytest.raises(ValueError, match="config.updates.packing='dense'"):
    packing.PackingSettings(packing="dense")


def _old_ref(rows, params):
  return aepo_step.old_and_ref_logprobs(rows, params, params, 1.0)


def test_layouts_give_the_same_log_probs():
  mcfg, params = _model()
  old = {k: _old_ref(_rows(mcfg, k), params)[0] for k in LAYOUTS}
  mask = _rows(mcfg, "none").loss_mask | (np.arange(WIDTH)[None] < np.array(LENGTHS)[:, None])
  for k in ("packed", "shared_prompt"):
    np.testing.assert_allclose(old[k][mask], old["none"][mask], atol=1e-5, err_msg=k)
  assert np.all(old["none"][mask] < 0)


def _aepo_loss_and_grads(mcfg, params, layout, loss_agg, mesh=None):
  rows = _rows(mcfg, layout)
  old, ref = _old_ref(rows, params)
  rng = np.random.default_rng(1)
  old = old + rng.normal(0, 0.2, old.shape).astype(np.float32)  # ratios away from 1: the clip is active somewhere
  settings = aepo_step.LossSettings(temperature=1.0, clip_low=0.2, clip_high=0.28, dual_clip=None, loss_agg=loss_agg)
  micro = aepo_step.micro_batches(rows, np.arange(len(rows)), old, ref, settings)
  assert sum(m.weight for m in micro) == pytest.approx(1.0)
  updater = Updater(aepo_step.aepo_loss_fn(mcfg), optim_lib.make_optimizer(optim_lib.OptimSettings(lr=1e-3), 1),
                    params, lora.frozen_names(params))
  accum, loss = updater.init_accum(params), 0.0
  for batch, s, weight in micro:
    accum, part, _ = updater.micro_step(params, accum, batch, np.float32(weight), s)
    loss += float(part)
  return loss, jax.tree.map(np.asarray, accum)


def _assert_same_grads(got, want, what):
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    scale = max(float(np.abs(w).max()), 1e-6)
    np.testing.assert_allclose(g / scale, w / scale, atol=1e-5, err_msg=f"{what}: {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean"])
def test_layouts_give_the_same_aepo_loss_and_gradients(loss_agg):
  mcfg, params = _model()
  want = _aepo_loss_and_grads(mcfg, params, "none", loss_agg)
  for layout in ("packed", "shared_prompt"):
    loss, grads = _aepo_loss_and_grads(mcfg, params, layout, loss_agg)
    assert loss == pytest.approx(want[0], rel=1e-5, abs=1e-7), layout
    _assert_same_grads(grads, want[1], layout)


@pytest.mark.slow
def test_layouts_agree_with_lora_on_eight_devices():
  assert jax.device_count() == 8, "tests/conftest.py simulates 8 CPU devices"
  mcfg, params = _model(adapters=True)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  boxed = models.abstract_params(mcfg)
  sharded = jax.device_put(params, sharding.param_shardings(boxed, mesh))
  want = _aepo_loss_and_grads(mcfg, params, "none", "token_mean")
  assert set(want[1]) == {lora.POLICY_KEY}  # the adapters train, the base is frozen
  # rows in multiples of the batch-sharding devices, as the stages lay them out (settings.packing(config, stage,
  # mesh)); with 1- and 2-row micro-batches on this mesh the adapters' gradients came out wrong (2% of their
  # scale) while the loss agreed: not root-caused, see docs/design.md §10.5
  LAYOUTS["shared_prompt"] = dataclasses.replace(LAYOUTS["shared_prompt"], batch_shards=sharding.batch_shards(mesh))
  for layout in ("none", "shared_prompt"):
    with sharding.mesh_context_of(sharded):
      loss, grads = _aepo_loss_and_grads(mcfg, sharded, layout, "token_mean")
    assert loss == pytest.approx(want[0], rel=1e-5), layout
    _assert_same_grads(grads, want[1], f"{layout} on 8 devices")


def test_sft_layouts_give_the_same_loss_and_gradients():
  mcfg, params = _model()
  rows = _rows(mcfg, "none")
  prompts = [rows.prompts[g] for g in GROUP]  # the same Prompt object: shared_prompt computes it once
  updater = sft.make_sft(mcfg, params, optim_lib.OptimSettings(lr=1e-3), 1, frozen=())
  out = {}
  for layout, s in LAYOUTS.items():
    accum, loss = updater.init_accum(params), 0.0
    for batch, settings, weight in sft.micro_batches(mcfg, prompts, rows.responses, s, 0):
      accum, part, _ = updater.micro_step(params, accum, batch, np.float32(weight), settings)
      loss += float(part)
    out[layout] = loss, jax.tree.map(np.asarray, accum)
  for layout in ("packed", "shared_prompt"):
    assert out[layout][0] == pytest.approx(out["none"][0], rel=1e-5)
    _assert_same_grads(out[layout][1], out["none"][1], f"sft {layout}")


def test_token_logprobs_read_the_named_column():
  mcfg, params = _model()
  r = _rows(mcfg, "packed").layout(range(len(GROUP)))[0]
  from ares_jax.train.sequences import scored_logits, token_logprobs
  logits = np.asarray(scored_logits(mcfg, params, r.inputs), np.float64)
  logp = np.asarray(token_logprobs(mcfg, params, r.inputs, jnp.asarray(r.src)))
  b, t = np.nonzero(r.scored)
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  want = logits[b, r.src[b, t], r.inputs.ids[b, t]] - lse[b, r.src[b, t]]
  np.testing.assert_allclose(logp[b, t], want, atol=1e-5)


def test_rows_come_in_multiples_of_the_batch_shards():
  """A row count the batch axis cannot split would run whole on every device (7B, fsdp=4: B=1 was planned
  at 4x the compute and the whole logits per device)."""
  s = packing.PackingSettings(packing="packed", row_tokens=64, tokens_per_micro_batch=64 * 10, batch_shards=4)
  assert s.rows_per_micro_batch == 8 and [s.rows_for(n) for n in (1, 3, 5, 8)] == [4, 4, 8, 8]
  c = load_config("aepo_7b.py")  # a model whose rows take three longest sequences (`row_fill.sequences_per_row`)
  c.rollout.max_prompt_length, c.rollout.max_response_length, c.aepo.micro_batch_size = 1000, 500, 8
  shared = packing.PackingSettings.from_config(c, "aepo", batch_shards=4)  # 8 x 1536 tokens over 4 devices
  assert (shared.row_tokens, shared.tokens_per_micro_batch, shared.rows_per_micro_batch) == (3072, 12288, 4)
  shared = packing.PackingSettings.from_config(c, "aepo")  # one device: 3 longest sequences a row
  assert (shared.row_tokens, shared.rows_per_micro_batch) == (3 * 1536, 2)
  c.updates.packing = "packed"
  assert packing.PackingSettings.from_config(c, "aepo", batch_shards=4).row_tokens == 1536
  mcfg, _ = _model()
  rows = _rows(mcfg, "shared_prompt")
  rows.packing = packing.PackingSettings(packing="shared_prompt", row_tokens=64, tokens_per_micro_batch=128,
                                         batch_shards=4)
  assert all(r.inputs.ids.shape[0] % 4 == 0 for r in rows.layout(range(len(rows))))


def test_rows_hold_fewer_sequences_where_attention_outweighs_the_linear_layers():
  """shared_prompt rows take up to three longest sequences, one where a row's every-tile attention would cost
  a token more than its linear layers: the tiny 64-wide model (measured 2.8x slower steps at three), not 7B."""
  tiny, big = load_config("tiny.py"), load_config("aepo_7b.py")
  layer = 2 * 64 * 4 * 16 + 2 * 64 * 2 * 16 + 3 * 64 * 128  # q and o, k and v, the MLP's three
  assert row_fill.linear_flops_per_token(tiny.model) == 2 * (2 * layer + 64 * tiny.model.vocab_size)
  assert row_fill.attention_flops_per_token(tiny.model, 384) == 4 * 64 * 384 * 2  # one tile: 384 keys a query
  # 1,152 tokens: tiles of 512, 3 a side, 6 in the causal triangle, each query's share of their keys
  assert row_fill.attention_flops_per_token(tiny.model, 1152) == pytest.approx(4 * 64 * (6 * 512 * 512 / 1152) * 2)
  assert row_fill.sequences_per_row(tiny.model, 384) == 1 and row_fill.sequences_per_row(big.model, 4096) == 3
  assert packing.PackingSettings.from_config(tiny, "aepo").row_tokens == 384
  assert row_fill.ATTENTION_TILE == blockwise_attention.DEFAULT_BLOCK


def test_part_filled_rows_share_the_narrow_micro_batches():
  """Rows come fullest first, so micro-batches cut from them in order are each as wide as their own fullest
  row: the part-filled rows share the last, narrow ones instead of widening every one; a part-filled
  micro-batch takes the place where the batch computes the fewest positions."""
  s = packing.PackingSettings(packing="packed", row_tokens=100, tokens_per_micro_batch=200)
  lengths = [90, 25, 95, 15, 60, 100, 40, 30]  # one prompt of 0 tokens each: items are the responses alone
  rows = row_fill.fill_rows(row_fill.items([0] * 8, range(8), lengths, range(8), s), 100)
  fills = [sum(it.length for it in row) for row in rows]
  # first-fit decreasing makes [100], [95], [90], [60 + 40], [30 + 25 + 15]; fullest first
  assert [sum((it.seqs for it in row), []) for row in rows] == [[5], [4, 6], [2], [0], [7, 1, 3]]
  assert fills == [100, 100, 95, 90, 70]
  mcfg, _ = _model()
  prompts = [Prompt(np.arange(3, 5, dtype=np.int32)) for _ in range(8)]
  responses = [np.full(n - 2, 7, np.int32) for n in lengths]
  widths = [r.inputs.ids.shape[1] for r in packing.layout(mcfg, prompts, np.arange(8), responses, 0, s)]
  # rows (100, 100), (95, 90), (70): shape buckets 100, 96 and 80; in first-fit order the second
  # micro-batch would hold (90, 100) and be 100 wide
  assert widths == [100, 96, 80]
  # a part-filled micro-batch goes where it costs least: one row of 100 alone (100 positions) rather than
  # widening a full micro-batch of 64s to 100 (392 positions in order, 356 so); it runs last
  lengths = [64, 100, 64, 64, 64]
  responses = [np.full(n - 2, 7, np.int32) for n in lengths]
  micro = packing.layout(mcfg, prompts[:5], np.arange(5), responses, 0, s)
  assert [r.inputs.ids.shape for r in micro] == [(2, 64), (2, 64), (1, 100)]
  assert sorted(np.concatenate([r.sequences() for r in micro]).tolist()) == list(range(5))
