"""AEPO (stage 2) on Qwen2.5-VL-7B-Instruct: the paper's 7B run (docs/design.md §5, §10.1).

  python -m ares_jax.main --config=configs/aepo_7b.py --config.model.hf_path=workdirs/adacs_7b/policy \
      --config.data.paths="('/data/ViRL39K',)"
  python -m ares_jax.main --config=configs/aepo_7b.py --config.stage=inspect --config.inspect.forward=False

Target: one TPU v5p-8 / v4-8 slice or 8 x H100; FSDP over all devices, heads over `tensor`.
"""

from ares_jax import configs


def get_config():
  c = configs.base_config(stage="aepo", workdir="workdirs/aepo_7b")
  c.total_steps = 500
  c.checkpoint_every = 50
  c.mesh.fsdp = -1
  # Real data, named on the command line (the run stops at startup, naming the field, until it is).
  c.data.kind = "files"
  c.model = configs.qwen25vl_7b()
  return c
