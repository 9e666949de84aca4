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
  # Synthetic task (data/synthetic.py): "Mod 10, start s, apply +d 5 times", where working carefully (a check
  # line after every step) is the policy's choice; the difficulty is the operand's level (1: +1..+3,
  # 2: +4..+6, 3: +7..+9). The solvers' steps have blind spots on 0, 12 and 30% of a level's (value, operand)
  # pairs and their checks on 10% of all pairs, so careful work pays on levels 2-3 and costs accuracy (and
  # 45 tokens) on level 1.
  c.data.task = "checks"
  c.data.ops = "+"
  c.data.min_steps, c.data.max_steps = 5, 5
  c.data.slips.levels, c.data.slips.check = (0.0, 0.12, 0.3), 0.1
  # The synthetic prompt is the bare question in one user turn, as the warm start's traces expect.
  c.data.system_prompt = ""
  c.data.instruction = ""
  c.data.images = False  # True: every other prompt also shows the problem as an image (vision path; ~4x slower)
  # Supervised warm start on programmatic traces, standing in for a pretrained base model: careful on half of
  # its traces whatever the problem, with the task's blind spots. It learns the addition table abruptly:
  # with weight decay 0.1 between steps 300 and ~400 (seeds 0, 1, 3), with 0.01 somewhere in 450-800
  # (seeds 0-2). 600 steps leave a margin.
  c.warm_start.steps = 600
  c.warm_start.batch_size = 32
  c.warm_start.lr = 3e-3
  c.warm_start.weight_decay = 0.1
  c.warm_start.check_rate = 0.5
  c.warm_start.slip_rate = 0.1  # task=steps: each step slips with this probability
  # AdaCS: 256 problems with two teacher traces each (quick and careful), pass rates of the warm-started policy
  # from 8 samples, 128 selected over the pass-rate tiers, 4 epochs of SFT.
  c.adacs.synthetic_questions = 256
  c.adacs.max_checks = 3  # task=steps: teacher traces re-check 0..3 of their last steps
  c.adacs.budget = 128
  c.adacs.batch_size = 16
  c.adacs.micro_batch_size = 16
  c.adacs.epochs = 4
  c.adacs.lr = 5e-4
  c.adacs.max_response_length = 112
  c.adacs.eval_prompts = 128  # the held-out problems AEPO evaluates on (eval.prompts)
  c.eval.every = 10
  c.eval.prompts = 128
  c.eval.samples = 4  # mean@4 at the rollout temperature: greedy decoding does not slip, sampling does
  c.rollout.n = 8
  c.rollout.max_branches = 4
  c.rollout.prompts_per_step = 8
  c.rollout.max_prompt_length = 256
  c.rollout.max_response_length = 112
  # A tiny model's decode step costs about the same whatever the groups in flight (it is all overhead), so
  # draining a call's tail saves nothing and each drained size is one more compile
  c.rollout.drain_halvings = 0
  # The task's moments of uncertainty are single tokens (whether to check a step; a value that may slip), so
  # the window is one token (Hbar_t = H_t): a window of 4 averages a decision with three certain tokens and
  # never reaches tau_high, and nothing would be marked or branched. Real text spreads a hesitation over
  # several tokens ("Wait, let me check"): the paper's w = 4-8, the default.
  c.aepo.window = 1
  c.aepo.global_batch_size = 48
  c.aepo.micro_batch_size = 48
  c.optim.lr = 5e-5  # a tiny policy takes larger steps than the paper's 7B (1e-6); 2e-4 diverged
  return c
