"""LoRA policies: peft (on transformers) is the reference for the adapters' math and file format.

Tiny random checkpoints built locally (hf_reference); float32 on CPU, the parity tolerance of
test_model_parity.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_reference as R
from ares_jax import settings as settings_lib
from ares_jax import models, sampling
from ares_jax.data.batching import Prompt
from ares_jax.models import lora, peft_io
from ares_jax.stages import policy as policy_lib
from ares_jax.aepo import step as aepo_step
from ares_jax.train import sft
from ares_jax.train import optimizer as optim_lib
from ares_jax.train.checkpoint import Checkpointer
from ares_jax.train.packing import PackingSettings
from ares_jax.train.sequences import pack, score, score_tokens
from ares_jax.train.update import Updater
from tiny_configs import load_config

TOL = 1e-4
ALL = lora.TARGETS  # the text projections, the vision blocks' attention and the merger
PEFT_ALL = (r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
            r"|.*visual\.blocks\.\d+\.attn\.(qkv|proj)|.*visual\.merger\.mlp\.(0|2)")  # the same, as peft's regex


def _all_targets(config):
  """One LoRA config for the parity tests (one compiled forward for all of them)."""
  return config.replace(lora=lora.LoraConfig(rank=4, alpha=8.0, targets=ALL))


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
  return R.saved_and_loaded(str(tmp_path_factory.mktemp("base")))


@pytest.fixture(scope="module")
def batch():
  return R.build_batch([[3, "img", 5], [7]], R.random_images([(84, 112)]), "left")


def _trained_adapters(config, seed: int = 1):
  """Adapters as training leaves them: A as initialised, B no longer 0."""
  ad = models.init_adapters(config, jax.random.key(seed))
  keys = iter(jax.random.split(jax.random.key(seed + 100), len(jax.tree.leaves(ad))))
  return jax.tree.map(lambda a: a + 0.05 * jax.random.normal(next(keys), a.shape, a.dtype), ad)


def _logits(config, params, batch):
  return np.asarray(models.forward(config, params, batch["input_ids"], batch["attention_mask"],
                                   batch.get("pixel_values"), batch.get("image_grid_thw")))


def _max_diff(a, b, batch):
  return float(np.abs(a - b)[batch["attention_mask"].astype(bool)].max())


def _hf_base_model(path):
  from transformers import Qwen2_5_VLForConditionalGeneration
  return Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval().float()


def test_fresh_adapters_leave_the_base_and_merging_changes_nothing(hf_base, batch):
  _, _, config, params = hf_base
  lcfg = _all_targets(config)
  fresh = models.init_adapters(lcfg, jax.random.key(0))
  flat = jax.tree_util.tree_flatten_with_path(fresh)[0]
  assert all(np.all(np.asarray(v) == 0) == (str(p[-1].key) == "lora_b") for p, v in flat)  # A random, B = 0
  base = _logits(config, params, batch)
  np.testing.assert_array_equal(_logits(lcfg, lora.with_adapters(params, fresh), batch), base)
  trained = lora.with_adapters(params, _trained_adapters(lcfg))
  adapted = _logits(lcfg, trained, batch)
  assert _max_diff(adapted, base, batch) > 0.1  # the adapters act, on the text and the vision side
  assert _max_diff(_logits(config, lora.merged(lcfg, trained), batch), adapted, batch) <= TOL
  # adapters off (the AEPO reference): the base config ignores the policy's adapters
  np.testing.assert_array_equal(_logits(lora.base_config(lcfg), trained, batch), base)


def test_peft_export_loads_in_peft_with_equal_logits(hf_base, batch, tmp_path):
  from peft import PeftModel
  _, path, config, params = hf_base
  lcfg = _all_targets(config)
  trained = lora.with_adapters(params, _trained_adapters(lcfg))
  peft_io.save_peft(str(tmp_path / "adapter"), lcfg, trained, path)
  meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert meta["r"] == 4 and meta["lora_alpha"] == 8.0 and meta["base_model_name_or_path"] == path
  assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
  peft_model = PeftModel.from_pretrained(_hf_base_model(path), str(tmp_path / "adapter")).eval()
  n_adapted = sum(1 for n, _ in peft_model.named_modules() if n.endswith(".lora_A"))
  assert n_adapted == 2 * 7 + 3 * 2 + 2  # 2 text layers x 7, 3 vision blocks x (qkv, proj), the merger's 2
  assert _max_diff(R.hf_logits(peft_model, batch), _logits(lcfg, trained, batch), batch) <= TOL
  # and it imports back as it was
  back = peft_io.load_peft(str(tmp_path / "adapter"), config.replace(
      lora=peft_io.read_lora_config(str(tmp_path / "adapter"))))
  jax.tree.map(np.testing.assert_array_equal, back, lora.adapters(trained))


def test_an_adapter_written_by_peft_imports_with_equal_logits(hf_base, batch, tmp_path):
  from peft import LoraConfig, get_peft_model
  model, path, config, params = hf_base
  torch.manual_seed(3)
  peft_model = get_peft_model(_hf_base_model(path), LoraConfig(
      r=4, lora_alpha=8, init_lora_weights=False, target_modules=PEFT_ALL)).eval()  # random A and B: trained
  peft_model.save_pretrained(str(tmp_path / "from_peft"))
  lcfg = config.replace(lora=peft_io.read_lora_config(str(tmp_path / "from_peft")))
  assert lcfg == _all_targets(config)
  ours = lora.with_adapters(params, peft_io.load_peft(str(tmp_path / "from_peft"), lcfg))
  want = R.hf_logits(peft_model, batch)
  assert _max_diff(want, R.hf_logits(model, batch), batch) > 0.1
  assert _max_diff(_logits(lcfg, ours, batch), want, batch) <= TOL


def test_stage_export_writes_merged_policy_peft_adapter_and_base(hf_base, batch, tmp_path):
  """policy.export of a run whose base is no folder on disk (the tiny warm start): policy/ loads in
  transformers, policy_adapter/ in peft onto the exported base/ it names; both equal the JAX model."""
  from peft import PeftModel
  _, _, config, params = hf_base
  lcfg = _all_targets(config)
  trained = lora.with_adapters(params, _trained_adapters(lcfg))
  c = load_config("tiny.py")
  c.workdir = str(tmp_path)
  assert policy_lib.base_folder(c) is None  # a warm-started synthetic run
  assert policy_lib.export(c, lcfg, trained, None) == str(tmp_path / "policy")
  want = _logits(lcfg, trained, batch)
  assert _max_diff(R.hf_logits(_hf_base_model(str(tmp_path / "policy")), batch), want, batch) <= TOL
  meta = json.loads((tmp_path / "policy_adapter" / "adapter_config.json").read_text())
  assert meta["base_model_name_or_path"] == str(tmp_path / "base")
  peft_model = PeftModel.from_pretrained(_hf_base_model(meta["base_model_name_or_path"]),
                                         str(tmp_path / "policy_adapter")).eval()
  assert _max_diff(R.hf_logits(peft_model, batch), want, batch) <= TOL


def _tiny_policy(rank=4, seed=0, **lora_kw):
  c = load_config("tiny.py")
  mcfg = settings_lib.model(c.model).replace(lora=lora.LoraConfig(rank=rank, **lora_kw))
  params = models.init_params(mcfg, jax.random.key(seed))
  params = lora.with_adapters(lora.frozen_base(mcfg, params), _trained_adapters(mcfg, seed + 1))
  return c, mcfg, params


def _rows(mcfg, n=4, width=16, seed=0):
  rng = np.random.default_rng(seed)
  prompts = [Prompt(rng.integers(5, 400, 20).astype(np.int32)) for _ in range(n)]
  responses = [rng.integers(5, 400, 12).astype(np.int32) for _ in range(n)]
  mask = np.zeros((n, width), bool)
  mask[:, :12] = True
  return aepo_step.UpdateRows(mcfg, prompts, np.arange(n), responses, np.array([1.0, -1.0] * (n // 2), np.float32),
                              mask, np.full((n, width), 0.05, np.float32),
                              PackingSettings(packing="none", micro_batch_size=n), width, 0)


def _assert_only_adapters_moved(before, after, opt_state):
  jax.tree.map(np.testing.assert_array_equal, lora.base_params(after), lora.base_params(before))
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), lora.adapters(after),
                       lora.adapters(before))
  assert all(jax.tree.leaves(moved))
  n_adapter = sum(x.size for x in jax.tree.leaves(lora.adapters(before)))
  n_opt = sum(x.size for x in jax.tree.leaves(opt_state) if getattr(x, "ndim", 0) > 0)
  assert n_opt == 2 * n_adapter  # Adam's two moments, for the adapters only


def test_aepo_reference_is_the_base_and_an_update_moves_only_adapters():
  c, mcfg, params = _tiny_policy(targets=("q", "k", "v", "o", "gate", "up", "down"))
  rows = _rows(mcfg)
  old, ref = aepo_step.old_and_ref_logprobs(rows, params, None, 1.0)
  r, = rows.layout(range(len(rows)))
  scored = lambda cfg, p: np.asarray(score_tokens(cfg, p, r.inputs, r.src, 1.0))[r.scored]
  np.testing.assert_array_equal(ref[rows.loss_mask], scored(lora.base_config(mcfg), lora.base_params(params)))
  np.testing.assert_array_equal(old[rows.loss_mask], scored(mcfg, params))
  assert np.abs(old - ref)[rows.loss_mask].max() > 1e-3
  c.optim.lr = 1e-3
  settings = settings_lib.loss(c)
  updater = Updater(aepo_step.aepo_loss_fn(mcfg), optim_lib.make_optimizer(settings_lib.optim(c), 10), params,
                    lora.frozen_names(params))
  state = updater.init_state(jax.tree.map(jnp.copy, params), jax.random.key(0))
  state, m = updater.update(state, aepo_step.micro_batches(rows, np.arange(len(rows)), old, ref, settings))
  assert m["update_skipped"] == 0 and m["kl"] > 0
  _assert_only_adapters_moved(params, state.params, state.opt_state)


def test_sft_update_moves_only_adapters_with_dropout():
  c, mcfg, params = _tiny_policy(dropout=0.1, targets=("v", "down"))
  rows = _rows(mcfg)
  updater = sft.make_sft(mcfg, params, c.optim, 10)
  assert updater.dropout and set(updater.frozen) == set(lora.base_params(params))
  state = updater.init_state(jax.tree.map(jnp.copy, params), jax.random.key(0))
  micro = sft.micro_batches(mcfg, rows.prompts, rows.responses, rows.packing, 0)
  state2, m = updater.update(state, micro)
  assert m["update_skipped"] == 0
  _assert_only_adapters_moved(params, state2.params, state2.opt_state)
  assert not np.array_equal(jax.random.key_data(state2.rng), jax.random.key_data(state.rng))  # masks move on


def test_checkpoints_hold_adapters_and_optimizer_state_only(tmp_path):
  c, mcfg, params = _tiny_policy(targets=("q", "v"))
  updater = sft.make_sft(mcfg, params, c.optim, 10)
  state = updater.init_state(params, jax.random.key(0))
  ckpt = Checkpointer(str(tmp_path), async_save=False, adapters_only=True)
  ckpt.save(1, state, {"k": 1})
  ckpt.wait()
  stored = ckpt._stored(state)  # pylint: disable=protected-access
  assert set(stored.params) == {lora.POLICY_KEY}
  size = lambda root: sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
  base_bytes = sum(x.nbytes for x in jax.tree.leaves(lora.base_params(params)))
  assert size(tmp_path / "1") < base_bytes / 4  # the base is not in it
  zeroed = lora.with_adapters(lora.base_params(params), jax.tree.map(jnp.zeros_like, lora.adapters(params)))
  template = updater.init_state(zeroed, jax.random.key(5))
  restored = ckpt.restore_latest(template)
  jax.tree.map(np.testing.assert_array_equal, restored.state.params, state.params)
  ckpt.close()


@pytest.mark.parametrize("merged", [True, False])
def test_decoding_with_merged_or_unmerged_adapters_matches_the_scorer(merged):
  """Rollout log-probs of a LoRA policy are the teacher-forced ones (so old log-probs and the sampler agree)."""
  _, mcfg, params = _tiny_policy(targets=("q", "k", "v", "o", "gate", "up", "down"))
  rng = np.random.default_rng(1)
  ids = rng.integers(5, 400, (2, 10)).astype(np.int32)
  batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
  sc = sampling.SamplingConfig(max_new_tokens=8, n=2, temperature=1.0, lora_merged=merged, pad_id=0,
                               track_entropy=False)
  out = sampling.generate(mcfg, params, batch, sc, jax.random.key(0))
  prompts = [Prompt(ids[g]) for g in out.prompt_index]
  responses = [out.tokens[s, :out.length[s]] for s in range(len(out.length))]
  p = pack(mcfg, prompts, responses, 0, response_width=8)
  want = np.asarray(score(mcfg, params, p.inputs, p.prompt_width, 1.0))
  valid = np.arange(8)[None] < out.length[:, None]
  np.testing.assert_allclose(out.logprobs[valid], want[valid], atol=2e-4)
