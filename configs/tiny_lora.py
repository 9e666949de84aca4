"""configs/tiny.py with a LoRA policy: rank-8 adapters on every decoder projection over the frozen base.

  python -m ares_jax.main --config=configs/tiny_lora.py

The warm start still trains the whole base (it stands in for pretraining); AdaCS's SFT and AEPO then train
the adapters only, AEPO's reference is the base with the adapters off, and every export writes `policy/`
(merged), `policy_adapter/` (PEFT) and `base/`. AEPO's adapters, which start at B = 0, take 10x tiny.py's
lr. Measured on the synthetic `steps` task (the tiny default before the `checks` task; README "LoRA
policies"): AEPO raised held-out accuracy at both lrs, faster at 5e-4; AdaCS's LoRA SFT raised it at 3e-4 and
lowered it at 1e-3. On the `checks` task, LoRA AEPO from a full-fine-tuned AdaCS policy raised held-out accuracy
0.68 -> 0.83 in 30 steps; LoRA's AdaCS SFT there (lr 5e-4, 4 epochs) is not measured.
"""

import os
import runpy


def get_config():
  c = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py"))["get_config"]()
  c.workdir = "workdirs/tiny_lora"
  c.model.lora.rank = 8
  c.model.lora.alpha = 16.0
  c.optim.lr = 5e-4
  return c
