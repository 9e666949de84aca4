"""AdaCS (stage 1) on Qwen2.5-VL-7B-Instruct with the paper's SFT values (docs/design.md §6.4): 2 epochs, lr 2e-5,
batch 256; the vision tower frozen.

  python -m ares_jax.main --config=configs/adacs_7b.py --config.model.hf_path=/data/Qwen2.5-VL-7B-Instruct \
      --config.adacs.pool_paths="('/data/ARES-Adaptive-Coldstart',)" --config.adacs.budget=100000

The pool is a folder (or files) of JSONL / parquet rows in the ARES cold-start layout; questions without
a `pass_rate` get one from 8 samples of the policy (resumable: {workdir}/pass_rates.jsonl). The SFT'd
policy is written to {workdir}/policy as a Hugging Face folder; point AEPO at it with
`--config.model.hf_path={workdir}/policy`, or run both with `--config.stage=ares`.
"""

from ares_jax import configs


def get_config():
  c = configs.base_config(stage="adacs", workdir="workdirs/adacs_7b")
  c.checkpoint_every = 200
  c.mesh.fsdp = -1
  # Real data, named on the command line (the run stops at startup, naming the field, until it is).
  c.data.kind = "files"
  c.model = configs.qwen25vl_7b()
  c.adacs.epochs = 2
  c.adacs.lr = 2e-5
  c.adacs.batch_size = 256
  c.adacs.micro_batch_size = 8
  c.adacs.freeze_vision = True
  c.adacs.pass_rate_samples = 8
  c.adacs.max_response_length = 4096
  c.rollout.max_response_length = 4096  # pass-rate samples
  c.optim.warmup_steps = 20
  c.optim.schedule = "cosine"
  return c
