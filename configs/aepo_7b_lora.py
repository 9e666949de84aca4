"""AEPO on Qwen2.5-VL-7B-Instruct with a LoRA policy, for small slices: a TPU v5e-8 (8 chips x 16 GiB) or one
80 GB GPU (design.md 7). configs/aepo_7b.py otherwise.

  python -m ares_jax.main --config=configs/aepo_7b_lora.py --config.model.hf_path=workdirs/adacs_7b/policy \
      --config.data.paths="('/data/ViRL39K',)"
  python -m ares_jax.plan --config=configs/aepo_7b_lora.py --topology=v5e:2x4

Rank-64 adapters on every decoder projection train; the base stays frozen in bf16 (1.9 GiB per chip over
8 chips instead of 7.1 GiB of fp32 weights, 15.4 GiB of AdamW moments and a 3.9 GiB bf16 reference on
4 chips for full fine-tuning): optimizer state exists for the adapters only, and the reference is the base
with the adapters off. Prompts 2048 + responses 2048 with one image of at most 1280 merged tokens (so
the image fits the prompt); rollouts in calls of 16 prompts x 12 slots (a 5.3 GiB bf16 KV cache per chip).
"""

import os
import runpy


def get_config():
  c = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "aepo_7b.py"))["get_config"]()
  c.workdir = "workdirs/aepo_7b_lora"
  c.model.lora.rank = 64
  c.model.lora.alpha = 128.0
  c.model.lora.targets = ("q", "k", "v", "o", "gate", "up", "down")
  c.optim.lr = 1e-5  # adapters from B = 0 take ~10x full fine-tuning's 1e-6
  c.processor.max_pixels = 1280 * 28 * 28  # <= 1280 image tokens: an image fits the 2048-token prompt
  c.rollout.max_prompt_length = 2048
  c.rollout.max_response_length = 2048
  c.rollout.chunk_prompts = 16  # KV cache 16 x 12 slots x 4096 positions x 56 KiB / 8 chips = 5.3 GiB per chip
  return c
