"""AEPO (stage 2) on Qwen2.5-VL-3B-Instruct (tied embeddings; 2 KV heads stay replicated on `tensor`).

  python -m ares_jax.main --config=configs/aepo_3b.py --config.model.hf_path=/data/Qwen2.5-VL-3B-Instruct \
      --config.data.paths="('/data/ViRL39K',)"
"""

from ares_jax import configs


def get_config():
  c = configs.base_config(stage="aepo", workdir="workdirs/aepo_3b")
  c.total_steps = 500
  c.checkpoint_every = 50
  c.mesh.fsdp = -1
  # Real data, named on the command line (the run stops at startup, naming the field, until it is).
  c.data.kind = "files"
  c.model = configs.model_fields(
      vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36, num_heads=16,
      num_kv_heads=2, rms_norm_eps=1e-6, rope_theta=1e6, mrope_section=(16, 24, 24),
      tie_word_embeddings=True, vision=configs.qwen25vl_vision(),
      dtype="bfloat16", param_dtype="float32", remat_policy="full")
  return c
