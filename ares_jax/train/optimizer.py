"""AdamW with global-norm clipping and a warm-up schedule (docs/design.md §5.10; paper: lr 1e-6, wd 1e-2)."""

from __future__ import annotations

import dataclasses

import optax

SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimSettings:
  """`config.optim` (configs.optim_defaults); the warm start and AdaCS's SFT replace lr (and the schedule)."""

  lr: float
  weight_decay: float = 1e-2
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  grad_clip: float = 1.0
  warmup_steps: int = 0
  schedule: str = "constant"  # constant (the paper) | cosine

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f"config.optim.schedule={self.schedule!r}; choose 'constant' or 'cosine'")


def learning_rate(optim: OptimSettings, total_steps: int) -> optax.Schedule:
  """Linear warm-up to `optim.lr`, then constant (the paper's RL schedule) or cosine decay to 0."""
  warmup = optim.warmup_steps
  if optim.schedule == "constant":
    decay = optax.constant_schedule(optim.lr)
  else:
    decay = optax.cosine_decay_schedule(optim.lr, max(total_steps - warmup, 1), alpha=0.0)
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), decay], [warmup])


def make_optimizer(optim: OptimSettings, total_steps: int) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(optim.grad_clip),
      optax.adamw(learning_rate(optim, total_steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                  weight_decay=optim.weight_decay))
