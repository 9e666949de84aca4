"""configs/tiny.py with a LoRA policy: rank-8 adapters on every decoder projection over the frozen base.

  python -m ares_jax.main --config=configs/tiny_lora.py

The warm start still trains the whole base (it stands in for pretraining); AdaCS's SFT and AEPO then train
the adapters only, AEPO's reference is the base with the adapters off, and every export writes `policy/`
(merged), `policy_adapter/` (PEFT) and `base/`. AEPO's adapters, which start at B = 0, take 10x tiny.py's
lr. Measured on the synthetic `steps` task (the tiny default before the `checks` task; docs/lora.md):
AEPO raised held-out accuracy at both lrs, faster at 5e-4; AdaCS's LoRA SFT raised it at 3e-4 and lowered it
at 1e-3. On the `checks` task, LoRA AEPO from a full-fine-tuned AdaCS policy raised held-out accuracy
0.68 -> 0.83 in 30 steps. LoRA's AdaCS SFT on the checks task (seed 0, 4 epochs): at tiny.py's 5e-4 it
barely moved (Spearman(length, difficulty) -0.01 -> 0.02; AEPO then made every answer careful, level 1 too);
at 2e-3 (here) -0.01 -> 0.65, held-out accuracy 0.61 -> 0.79; 5e-3 gave 0.52 and 0.78.
"""

import os
import runpy


def get_config():
  c = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py"))["get_config"]()
  c.workdir = "workdirs/tiny_lora"
  c.model.lora.rank = 8
  c.model.lora.alpha = 16.0
  c.adacs.lr = 2e-3  # measured on the checks task (module docstring); tiny.py's 5e-4 barely moves the adapters
  c.optim.lr = 5e-4
  return c
