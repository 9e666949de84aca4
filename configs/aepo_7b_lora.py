"""AEPO on Qwen2.5-VL-7B-Instruct with a LoRA policy, for small slices such as a TPU v5e-8 (8 chips x 16 GiB;
docs/design.md §10.1). configs/aepo_7b.py otherwise.

  python -m ares_jax.main --config=configs/aepo_7b_lora.py --config.model.hf_path=workdirs/adacs_7b/policy \
      --config.data.paths="('/data/ViRL39K',)"
  python -m ares_jax.plan --config=configs/aepo_7b_lora.py --topology=v5e:2x4

Rank-64 adapters on every decoder projection train; the base stays frozen in bf16: 2.2 GiB of policy
weights and 0.9 GiB of AdamW moments per chip over 8 chips (full fine-tuning on 4 v5p chips holds 7.1 GiB of
fp32 weights, 15.4 GiB of moments and a 3.9 GiB bf16 reference per chip). The reference is the base
with the adapters off. Prompts 2048 + responses 2048 with one image of at most 1280 merged tokens (so
the image fits the prompt); rollouts in calls of 4 prompts x 12 slots.
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
  # Rollout calls of 4 prompts x 12 slots (a bf16 KV cache of 1.3 GiB per chip), planned at a 15.09 GiB peak, just
  # under 95% of 16: the rollout's temporaries are 10.0 GiB at 4 prompts, 10.1 at 6 (15.26 GiB peak: over) and
  # 16.3 at 16, mostly not the KV cache.
  c.rollout.chunk_prompts = 4
  return c
