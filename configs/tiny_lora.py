"""configs/tiny.py with a LoRA policy: rank-8 adapters on every decoder projection over the frozen base.

  python -m ares_jax.main --config=configs/tiny_lora.py

The warm start still trains the whole base (it stands in for pretraining); AdaCS's SFT and AEPO then train
the adapters only, AEPO's reference is the base with the adapters off, and every export writes `policy/`
(merged), `policy_adapter/` (PEFT) and `base/`. Adapters start at B = 0 and move only through a rank-8
product, so the tiny policy takes larger learning rates than its full fine-tuning (tiny.py's 3e-4 and
5e-5); README "LoRA" gives the held-out accuracy this reaches.
"""

import os
import runpy


def get_config():
  c = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py"))["get_config"]()
  c.workdir = "workdirs/tiny_lora"
  c.model.lora.rank = 8
  c.model.lora.alpha = 16.0
  c.adacs.lr = 1e-3
  c.optim.lr = 5e-4
  return c
