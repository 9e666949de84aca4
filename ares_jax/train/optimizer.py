"""AdamW with global-norm clipping and a warm-up schedule (design.md 5.10; paper: lr 1e-6, wd 1e-2)."""

from __future__ import annotations

import ml_collections
import optax


def learning_rate(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warm-up to `optim.lr`, then constant (the paper's RL schedule) or cosine decay."""
  warmup = int(optim.get("warmup_steps", 0))
  kind = optim.get("schedule", "constant")
  if kind == "constant":
    decay = optax.constant_schedule(optim.lr)
  elif kind == "cosine":
    decay = optax.cosine_decay_schedule(optim.lr, max(total_steps - warmup, 1), alpha=optim.get("final_lr_frac", 0.0))
  else:
    raise ValueError(f"config.optim.schedule={kind!r}; choose 'constant' or 'cosine'")
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), decay], [warmup])


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(optim.grad_clip),
      optax.adamw(learning_rate(optim, total_steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                  weight_decay=optim.weight_decay))
