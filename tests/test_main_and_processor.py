"""Entry point, configs, tiny tokenizer and the Qwen2.5-VL processor (CPU, a few seconds each)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ares_jax import settings as settings_lib
from ares_jax.data import images as images_lib
from ares_jax.data import processor as processor_lib
from ares_jax.data import tokenizer as tokenizer_lib
from tiny_configs import load_config

ROOT = Path(__file__).resolve().parents[1]
MIN_PIXELS, MAX_PIXELS = 28 * 28 * 4, 28 * 28 * 64


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp("ares_cache"))


@pytest.fixture(scope="module")
def tok(cache_dir):
  return tokenizer_lib.tiny_tokenizer(cache_dir)


def _images(sizes, seed=0):
  rng = np.random.default_rng(seed)
  return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


# --- tokenizer -------------------------------------------------------------------------------


def test_tiny_tokenizer_special_tokens_and_round_trip(tok):
  assert len(tok) == tokenizer_lib.TINY_VOCAB_SIZE
  for token, i in tokenizer_lib.TINY_SPECIAL_IDS.items():
    assert tok.convert_tokens_to_ids(token) == i
    assert tok.encode(token, add_special_tokens=False) == [i]
  assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
  text = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Find x if 3x + 5 = 20, café ∑.<|im_end|>\n"
          "<|im_start|>assistant\n<think>3x = 15</think> \\boxed{5}<|im_end|>")
  ids = tok.encode(text, add_special_tokens=False)
  assert tok.decode(ids) == text
  plain = tok.decode(ids, skip_special_tokens=True)
  assert "<think>3x = 15</think>" in plain and "<|im_end|>" not in plain


def test_tiny_tokenizer_is_deterministic_and_loadable(tmp_path, tok):
  a = tokenizer_lib.tiny_tokenizer(str(tmp_path / "a"))
  b = tokenizer_lib.tiny_tokenizer(str(tmp_path / "b"))
  folder = f"tiny_tokenizer_v{tokenizer_lib.TINY_TOKENIZER_VERSION}"
  assert (tmp_path / "a" / folder / "tokenizer.json").read_bytes() == \
      (tmp_path / "b" / folder / "tokenizer.json").read_bytes()
  text = "The area is 1/2 * 6 * 4 = 12."
  assert a.encode(text) == b.encode(text) == tok.encode(text)
  loaded = tokenizer_lib.load_tokenizer(str(tmp_path / "a" / folder))
  assert loaded.encode(text) == a.encode(text) and loaded.padding_side == "left"
  with pytest.raises(FileNotFoundError, match="never downloaded"):
    tokenizer_lib.load_tokenizer(str(tmp_path / "missing"))


# --- processor -------------------------------------------------------------------------------


def test_processor_matches_stock_image_processor(tok):
  proc = processor_lib.QwenVLProcessor.create(tok, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
  imgs = _images([(60, 90), (300, 200), (28, 28)])
  batch = proc.encode_chat(["What is shown?", "Text only.", "Compare the two pictures."],
                           [imgs[0], None, [imgs[1], imgs[2]]])
  ref = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)(images=imgs, return_tensors="np")
  np.testing.assert_array_equal(batch["pixel_values"], ref["pixel_values"])
  np.testing.assert_array_equal(batch["image_grid_thw"], ref["image_grid_thw"])
  assert batch["pixel_values"].dtype == np.float32 and batch["image_grid_thw"].dtype == np.int64
  assert batch["input_ids"].dtype == np.int64 and batch["attention_mask"].dtype == np.int64

  grid = batch["image_grid_thw"]
  per_image = grid.prod(-1) // 4
  ids, mask = batch["input_ids"], batch["attention_mask"]
  image_id = tokenizer_lib.TINY_SPECIAL_IDS["<|image_pad|>"]
  np.testing.assert_array_equal((ids == image_id).sum(1), [per_image[0], 0, per_image[1] + per_image[2]])
  np.testing.assert_array_equal(batch["mm_token_type_ids"], (ids == image_id).astype(np.int64))
  # left padding: each row is [pad..., tokens...] and the pad id is <|endoftext|>
  for row in range(len(ids)):
    n = mask[row].sum()
    assert mask[row, -n:].all() and not mask[row, :-n].any()
    assert (ids[row, :-n] == tok.pad_token_id).all()
  # the HF recipe: expand each placeholder to its merged-patch count, then tokenize and pad left
  texts = [proc.chat_prompt("What is shown?", 1), proc.chat_prompt("Text only."),
           proc.chat_prompt("Compare the two pictures.", 2)]
  expanded, k = [], 0
  for t in texts:
    parts = t.split("<|image_pad|>")
    out = parts[0]
    for part in parts[1:]:
      out += "<|image_pad|>" * int(per_image[k]) + part
      k += 1
    expanded.append(out)
  ref_ids = tok(expanded, padding=True, padding_side="left", return_tensors="np")
  np.testing.assert_array_equal(ids, ref_ids["input_ids"])
  np.testing.assert_array_equal(mask, ref_ids["attention_mask"])
  assert texts[0] == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is shown?<|im_end|>\n"
                      "<|im_start|>assistant\n")


def test_processor_pixel_bounds_and_errors(tok):
  proc = processor_lib.QwenVLProcessor.create(tok, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
  out = proc(["<|vision_start|><|image_pad|><|vision_end|>big"], _images([(1000, 700)]))
  _, h, w = out["image_grid_thw"][0]
  assert MIN_PIXELS <= h * w * 14 * 14 <= MAX_PIXELS and h % 2 == 0 and w % 2 == 0
  right = proc(["a", "a much longer prompt"], padding_side="right")
  assert right["attention_mask"][0, 0] == 1 and right["attention_mask"][0, -1] == 0
  with pytest.raises(processor_lib.ProcessorError, match="give data.video.Clip"):
    proc(["<|vision_start|><|video_pad|><|vision_end|>"], videos=[np.zeros((2, 28, 28, 3))])
  with pytest.raises(processor_lib.ProcessorError, match="1 <\\|video_pad\\|> placeholders but 0 videos"):
    proc(["<|vision_start|><|video_pad|><|vision_end|>"])
  with pytest.raises(processor_lib.ProcessorError, match="1 <\\|image_pad\\|> placeholders but 2 images"):
    proc(["<|image_pad|>"], _images([(56, 56), (56, 56)]))
  with pytest.raises(processor_lib.ProcessorError, match="min_pixels"):
    processor_lib.QwenVLProcessor.create(tok, min_pixels=10, max_pixels=5)


# --- configs and the entry point ---------------------------------------------------------------


def test_config_files_build_model_configs():
  tiny = settings_lib.model(load_config("tiny.py").model)
  assert tiny.text.vocab_size == tokenizer_lib.TINY_VOCAB_SIZE
  assert tiny.image_token_id == tokenizer_lib.TINY_SPECIAL_IDS["<|image_pad|>"]
  assert tiny.vision.fullatt_block_indexes == (1,)
  seven = load_config("aepo_7b.py")
  m7 = settings_lib.model(seven.model)
  assert (m7.text.hidden_size, m7.text.num_layers, m7.text.num_kv_heads, m7.text.vocab_size) == (3584, 28, 4, 152064)
  assert not m7.tie_word_embeddings and m7.vision.out_hidden_size == 3584
  assert (seven.aepo.clip_low, seven.aepo.clip_high, seven.optim.lr, seven.rollout.n) == (0.2, 0.28, 1e-6, 8)
  m3 = settings_lib.model(load_config("aepo_3b.py").model)
  assert m3.tie_word_embeddings and m3.vision.out_hidden_size == 2048 and m3.text.num_layers == 36
  bad = load_config("tiny.py")
  bad.model.mrope_section = (4, 4, 4)
  with pytest.raises(ValueError, match="config.model.mrope_section"):
    settings_lib.model(bad.model)


def test_inspect_stage_on_tiny_config(cache_dir, monkeypatch, capsys):
  from ares_jax.stages import inspect_model

  monkeypatch.setenv("ARES_JAX_CACHE", cache_dir)
  summary = inspect_model.run(load_config("tiny.py"))
  counts = summary["counts"]
  assert counts["total"] == counts["text"] + counts["vision"] > 0
  rows, length = summary["batch_shape"]
  assert summary["logits_shape"] == (rows, length, tokenizer_lib.TINY_VOCAB_SIZE)
  assert all(len(words) == 5 for words in summary["top_tokens"]) and summary["finite"]
  out = capsys.readouterr().out
  assert "visual/patch_embed/kernel" in out and "logits: shape" in out and "finite True" in out
  # the video prompt's layout: text, then one run of video tokens with its grid and time step, then text
  layout = out.split("a video prompt's tokens:\n")[1].split("\ninput_ids")[0]
  run = re.search(r"<\|video_pad\|> x (\d+) \(video 0: grid t=(\d+) h=(\d+) w=(\d+), ([\d.]+) s per temporal patch\)",
                  layout)
  assert run and int(run[1]) == int(run[2]) * int(run[3]) * int(run[4]) // 4, layout
  assert "top-5 next tokens (video prompt)" in out


def test_inspect_real_shapes_without_weights():
  from ares_jax.stages import inspect_model

  config = load_config("aepo_7b.py")
  config.inspect.forward = False
  assert inspect_model.run(config)["counts"]["total"] == 8_292_166_656  # Qwen2.5-VL-7B
  config = load_config("aepo_3b.py")
  config.inspect.forward = False
  assert inspect_model.run(config)["counts"]["total"] == 3_754_622_976  # Qwen2.5-VL-3B (tied)


def _main(*args: str, devices: int = 1, cache: str | None = None) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  if cache:
    env["ARES_JAX_CACHE"] = cache
  return subprocess.run([sys.executable, "-m", "ares_jax.main", "--config=configs/tiny.py", "--config.stage=inspect",
                         *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_main_runs_inspect_on_simulated_mesh(cache_dir):
  r = _main("--config.mesh.fsdp=2", "--config.mesh.tensor=4", devices=8, cache=cache_dir)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "mesh: {'data': 1, 'fsdp': 2, 'tensor': 4}" in r.stdout
  # image, text and video prompts, two each
  assert "P(None, 'fsdp', 'tensor')" in r.stdout and "logits: shape (6," in r.stdout


def test_main_bad_override_names_the_field():
  r = _main("--config.mesh.fsdpp=2")
  assert r.returncode != 0
  assert "--config.mesh.fsdpp=2: config.mesh has no field 'fsdpp'" in r.stderr
  assert "Traceback" not in r.stderr


def test_main_unknown_stage_is_a_clear_error():
  from ares_jax import main

  with pytest.raises(main.StageNotAvailable, match="unknown stage 'bogus'; available: inspect"):
    main.resolve_stage("bogus")


@pytest.mark.slow
def test_drawn_image_is_deterministic():
  a = np.asarray(images_lib.draw_polygon_image(64, 80, sides=5, seed=3))
  b = np.asarray(images_lib.draw_polygon_image(64, 80, sides=5, seed=3))
  assert a.shape == (64, 80, 3) and (a == b).all()
