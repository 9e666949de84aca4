"""AEPO (stage 2) on Qwen2.5-VL-7B-Instruct: the paper's 7B run (design.md 5, 7).

  python -m ares_jax.main --config=configs/aepo_7b.py --config.model.hf_path=/data/Qwen2.5-VL-7B-Instruct
  python -m ares_jax.main --config=configs/aepo_7b.py --config.stage=inspect --config.inspect.forward=False

Target: one TPU v5p-8 / v4-8 slice or 8 x H100; FSDP over all devices, heads over `tensor`.
"""

from ares_jax import configs


def get_config():
  c = configs.base_config(stage="aepo", workdir="workdirs/aepo_7b")
  c.total_steps = 500
  c.checkpoint_every = 50
  c.mesh.fsdp = -1
  c.model = configs.model_fields(
      vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
      num_kv_heads=4, rms_norm_eps=1e-6, rope_theta=1e6, mrope_section=(16, 24, 24),
      tie_word_embeddings=False, vision=configs.qwen25vl_vision(),
      dtype="bfloat16", param_dtype="float32", remat_policy="full")
  return c
