"""A tiny Qwen2.5-VL-shaped model with the built-in tiny tokenizer: every stage on a laptop CPU.

  python -m ares_jax.main --config=configs/tiny.py          # ARES on the synthetic task: AdaCS, then AEPO
  python -m ares_jax.main --config=configs/tiny.py --config.stage=aepo     # AEPO alone (after a warm start)
  python -m ares_jax.main --config=configs/tiny.py --config.stage=adacs    # AdaCS alone
  python -m ares_jax.main --config=configs/tiny.py --config.stage=inspect
  python -m ares_jax.main --config=configs/tiny.py --config.mesh.fsdp=2 --config.mesh.tensor=4
      (with XLA_FLAGS=--xla_force_host_platform_device_count=8 to simulate 8 devices)

Same structure as the real models (GQA, M-RoPE, windowed + full-attention vision blocks, an
untied LM head) at a size where a forward pass takes milliseconds.
"""

from ares_jax import configs
from ares_jax.data.tokenizer import TINY_SPECIAL_IDS, TINY_VOCAB_SIZE


def get_config():
  c = configs.base_config(stage="ares", workdir="workdirs/tiny")
  c.total_steps = 60
  c.checkpoint_every = 20
  c.mesh.fsdp = -1  # all local devices
  c.tokenizer.kind = "tiny"
  c.processor.min_pixels = 28 * 28 * 4
  c.processor.max_pixels = 28 * 28 * 64
  c.model = configs.model_fields(
      vocab_size=TINY_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
      num_kv_heads=2, tie_word_embeddings=False, rope_theta=10000.0, mrope_section=(2, 3, 3),
      max_position_embeddings=4096,
      vision=configs.qwen25vl_vision(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                     fullatt_block_indexes=(1,)),
      token_ids=dict(image_token_id=TINY_SPECIAL_IDS["<|image_pad|>"],
                     video_token_id=TINY_SPECIAL_IDS["<|video_pad|>"],
                     vision_start_token_id=TINY_SPECIAL_IDS["<|vision_start|>"],
                     vision_end_token_id=TINY_SPECIAL_IDS["<|vision_end|>"],
                     bos_token_id=TINY_SPECIAL_IDS["<|endoftext|>"],
                     eos_token_id=TINY_SPECIAL_IDS["<|im_end|>"]))
  # Synthetic task: "Mod 10, start s, apply +d k times", k = 1..8 is the difficulty.
  c.data.ops = "+"
  c.data.min_steps, c.data.max_steps = 1, 8
  # The synthetic prompt is the bare question in one user turn, as the warm start's traces expect.
  c.data.system_prompt = ""
  c.data.instruction = ""
  c.data.images = False  # True: every other prompt also shows the problem as an image (vision path; ~4x slower)
  # Supervised warm start on programmatic traces, standing in for a pretrained base model. Each step of
  # a trace slips (comes out one too high) with probability 0.1, so the warm-started policy computes
  # every step right when greedy but slips when it samples: its pass rate ~0.9^k spreads over easy,
  # medium and hard, and not slipping is what AdaCS's correct traces and AEPO's reward teach it.
  # The addition table is learnt abruptly: with weight decay 0.1 between steps 300 and ~400 (seeds 0,
  # 1, 3), with 0.01 somewhere in 450-800 (seeds 0-2). 600 steps leave a margin.
  c.warm_start.steps = 600
  c.warm_start.batch_size = 32
  c.warm_start.lr = 3e-3
  c.warm_start.weight_decay = 0.1
  c.warm_start.slip_rate = 0.1
  # AdaCS: 256 problems, four teacher traces each (0-3 re-checks, some with a slip), pass rates of the
  # warm-started policy from 8 samples, 128 selected over the pass-rate tiers, 2 epochs of SFT.
  c.adacs.synthetic_questions = 256
  c.adacs.max_checks = 3
  c.adacs.budget = 128
  c.adacs.batch_size = 16
  c.adacs.micro_batch_size = 16
  c.adacs.lr = 3e-4  # held-out mean@4 accuracy 0.64 -> 0.74 over the 2 epochs
  c.adacs.max_response_length = 96
  c.eval.every = 10
  c.eval.prompts = 128
  c.eval.samples = 4  # mean@4 at the rollout temperature: greedy decoding does not slip, sampling does
  c.rollout.n = 8
  c.rollout.max_branches = 4
  c.rollout.prompts_per_step = 8
  c.rollout.max_prompt_length = 256
  c.rollout.max_response_length = 96
  c.aepo.global_batch_size = 48
  c.aepo.micro_batch_size = 48
  c.optim.lr = 5e-5  # a tiny policy takes larger steps than the paper's 7B (1e-6); 2e-4 diverged
  return c
