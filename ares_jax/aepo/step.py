"""One AEPO step after the rollouts are graded (docs/design.md §5.2-5.10): from trajectories and their accuracy to
an optimizer update, on top of the pure math of this package.

    shaped = shape_batch(rollouts, accuracy, fmt, shaping, prev_tau, prev_ema, triggers)   # §5.2-5.9, host
    rows = UpdateRows.from_rollouts(mcfg, rollouts, shaped, prompts, ppo.packing, width, pad_id)
    state, metrics = ppo_update(state, ref_params, updater, rows, loss, ppo, step, guard)   # §5.10

`shape_batch`: tau_high, N_HE, difficulty bins, hierarchical rewards (+ format), GRPO advantages, the online
filter, KL weights and the loss masks (a branch trains from its fork on). `ppo_update`: old and reference
log-probs of the kept trajectories, then `ppo.epochs` passes of mini-batches of whole groups in a shuffled
order (one optimizer update each, `train.update.Updater`) of micro-batches, each weighted by its share of the
mini-batch loss.

Micro-batches are update rows of `train.packing` in the layout `ppo.packing` names (default: each prompt once
per group of responses, rows packed to a token budget); the programs compile once per row count and image
bucket, a handful per run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ares_jax import aepo, sharding
from ares_jax.data.batching import Prompt
from ares_jax.models import lora
from ares_jax.models.config import ModelConfig
from ares_jax.models.qwen25vl import ModelInputs
from ares_jax.sampling import Rollouts
from ares_jax.train import run_control
from ares_jax.train import packing as packing_lib
from ares_jax.train.packing import PackingSettings
from ares_jax.train.sequences import score_tokens, token_logprobs
from ares_jax.train.state import TrainState
from ares_jax.train.update import LossFn, MicroBatch, Updater

BIN_NAMES = ("easy", "medium", "hard")


# ------------------------------------------------------------------------------------------- settings

@dataclasses.dataclass(frozen=True, kw_only=True)
class ShapingSettings:
  """`config.aepo`'s statistics, rewards, filter and KL budget (docs/design.md §5.2-5.9; configs.aepo_defaults)."""

  entropy_quantile: float = 0.95
  tau_ema: float = 0.0  # 0: off
  easy_threshold: float = 2 / 3
  hard_threshold: float = 1 / 3
  target_mode: str = "correct_mean"
  eps: float = 1e-6
  max_penalty: float = 1.0
  format_weight: float = 0.0
  filter_low: float = 0.01
  filter_high: float = 0.99
  window: int = 4  # w: KL-relaxed tokens per marked window
  kl_coef: float = 1e-2
  kl_bin_scale: tuple[float, float, float] = (2.0, 1.0, 0.5)
  rho: float = 0.5


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossSettings:
  """The static part of an AEPO micro-batch (hashable: a static argument of the compiled micro-step)."""

  temperature: float  # the rollout's: log-probs of the sampling distribution
  clip_low: float
  clip_high: float
  dual_clip: float | None  # None: off
  loss_agg: str  # token_mean | seq_mean_token_mean


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOSettings:
  """How one rollout batch is trained on: `epochs` passes of mini-batches of `global_batch_size` trajectories."""

  global_batch_size: int
  packing: PackingSettings  # how micro-batches are laid out (`updates.*`)
  epochs: int = 1
  seed: int = 0  # with the step, seeds the mini-batch shuffle


# --------------------------------------------------------------------------- statistics and rewards

@dataclasses.dataclass
class Shaped:
  """Per-trajectory results of the statistics of one batch."""

  reward: np.ndarray  # [S]
  adv: np.ndarray  # [S]
  bins: np.ndarray  # [S]
  n_he: np.ndarray  # [S]
  train: np.ndarray  # [S] bool: used slot of a group kept by the online filter
  loss_mask: np.ndarray  # [S, N] bool
  kl_weights: np.ndarray  # [S, N]
  tau_high: float
  ema_state: np.ndarray
  metrics: dict[str, float]


def trigger_positions(r: Rollouts, trigger_tokens: np.ndarray | None) -> np.ndarray | None:
  """[S, N] bool: window starts whose token is a trigger word (`aepo.trigger_words`, docs/design.md §5.3), given
  the vocabulary table of `data.tokenizer.word_token_table`; None (every window counts) without one."""
  if trigger_tokens is None:
    return None
  return trigger_tokens[np.clip(r.tokens, 0, len(trigger_tokens) - 1)] & r.mask


def shape_batch(r: Rollouts, accuracy: np.ndarray, fmt: np.ndarray, s: ShapingSettings, prev_tau: float,
                prev_ema: np.ndarray, trigger_tokens: np.ndarray | None = None) -> Shaped:
  """tau_high (§5.2), N_HE (§5.3), bins (§5.5), R (§5.6-5.7), A (§5.8), the online filter and beta_it (§5.9)."""
  used = r.used
  at = trigger_positions(r, trigger_tokens)
  groups = r.prompt_index
  mask = r.mask
  tau = float(aepo.entropy_threshold(r.entropy, mask, s.entropy_quantile))
  if s.tau_ema > 0:
    tau = float(aepo.ema_threshold(prev_tau, tau, s.tau_ema))
  n_he = np.asarray(aepo.hwe_counts(r.window_entropy, r.window_valid, tau, at))
  bins = np.asarray(aepo.difficulty_bins(accuracy, groups, s.easy_threshold, s.hard_threshold, traj_mask=used))
  reward, stats = aepo.hierarchical_reward(
      accuracy, n_he, bins, s.target_mode, eps=s.eps, max_penalty=s.max_penalty,
      ema_state=jnp.asarray(prev_ema), traj_mask=used)
  reward = np.asarray(reward) + s.format_weight * fmt * used
  adv = np.asarray(aepo.grpo_advantages(reward, groups, traj_mask=used))
  keep = np.asarray(aepo.group_filter_mask(accuracy, groups, s.filter_low, s.filter_high, traj_mask=used))
  hwe_now = np.asarray(aepo.hwe_marks(r.window_entropy, r.window_valid, tau, at))
  window_mask = aepo.hwe_window_mask(hwe_now, s.window)
  beta = s.kl_coef * jnp.asarray(s.kl_bin_scale, jnp.float32)
  weights = np.asarray(aepo.kl_weights(bins, window_mask, beta, s.rho))
  cols = np.arange(mask.shape[1])[None, :]
  loss_mask = mask & (cols >= np.maximum(r.fork_pos, 0)[:, None])  # a branch trains from its fork on

  m: dict[str, float] = {
      "reward/mean": float(reward[used].mean()), "accuracy/mean": float(accuracy[used].mean()),
      "format/mean": float(fmt[used].mean()), "tau_high": tau,
      "entropy/mean": float(r.entropy[mask].mean()) if mask.any() else 0.0,
      "length/mean": float(r.length[used].mean()), "branches": float((r.parent >= 0).sum()),
      "filtered_groups": float(len(np.unique(groups[used & ~keep]))),
      "groups": float(len(np.unique(groups[used]))), "train_trajectories": float((keep & used).sum())}
  for d, name in enumerate(BIN_NAMES):
    sel = used & (bins == d)
    m[f"count/{name}"] = float(sel.sum())
    m[f"accuracy/{name}"] = float(accuracy[sel].mean()) if sel.any() else float("nan")
    m[f"length/{name}"] = float(r.length[sel].mean()) if sel.any() else float("nan")
    m[f"n_he/{name}"] = float(n_he[sel].mean()) if sel.any() else float("nan")
    m[f"lambda/{name}"] = float(stats["lambda"][d])
    m[f"target/{name}"] = float(stats["target"][d])
  ema = np.asarray(stats.get("ema_state", prev_ema))
  return Shaped(reward, adv, bins, n_he, keep & used, loss_mask, weights, tau, ema, m)


# ------------------------------------------------------------------------------------------ the loss

@struct.dataclass
class AepoBatch:
  """One AEPO micro-batch: update rows (`train.packing.Rows`, any layout) and, per token, what the loss weighs
  it by (0 / False where no response token is scored)."""

  inputs: ModelInputs  # [B, T]
  src: jax.Array  # [B, T] int32: the column whose logits predict each token
  old_logp: jax.Array  # [B, T] log pi_old (the rollout policy)
  ref_logp: jax.Array  # [B, T] log pi_ref
  adv: jax.Array  # [B, T] the advantage of each token's trajectory
  loss_mask: jax.Array  # [B, T] bool: tokens trained on
  weights: jax.Array  # [B, T] beta_it
  seq_weight: jax.Array  # [B, T] 1 / (loss tokens of the token's trajectory): seq_mean_token_mean over packed rows


def aepo_loss_fn(model_config: ModelConfig) -> LossFn:
  """(params, AepoBatch, LossSettings, dropout key) -> (the AEPO loss of one micro-batch, its metrics)."""
  def loss(params, batch: AepoBatch, s: LossSettings, dropout_key=None):
    logp = token_logprobs(model_config, params, batch.inputs, batch.src, s.temperature, dropout_key=dropout_key)
    return aepo.aepo_loss(logp, batch.old_logp, batch.ref_logp, batch.adv, batch.loss_mask, batch.weights,
                          clip_low=s.clip_low, clip_high=s.clip_high, dual_clip=s.dual_clip, loss_agg=s.loss_agg,
                          seq_weight=batch.seq_weight)
  return loss


def reference_copy(params: Any, dtype: str) -> Any:
  """The reference policy: the parameters in `dtype` (e.g. bfloat16, half the memory), same shardings,
  in buffers of their own (updates donate the policy's)."""
  dt = jnp.dtype(dtype)
  return jax.tree.map(lambda x: x.astype(dt) if x.dtype != dt else jnp.copy(x), params)


def reference_template(params: Any, dtype: str) -> Any:
  """Abstract shapes of `reference_copy(params, dtype)`, to restore a checkpointed reference onto."""
  dt = jnp.dtype(dtype)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dt, sharding=x.sharding), params)


# ------------------------------------------------------------------------------------ the update rows

@dataclasses.dataclass
class UpdateRows:
  """The trajectories one RL step trains on, with their advantages, loss masks and KL weights; laid out in
  micro-batches of update rows (`train.packing`, `updates.packing`) on demand, each layout made once."""

  model_config: ModelConfig
  prompts: Sequence[Prompt]  # one per group
  group: np.ndarray  # [n] int: the prompt of each trajectory
  responses: Sequence[np.ndarray]
  adv: np.ndarray  # [n]
  loss_mask: np.ndarray  # [n, width] bool
  kl_weights: np.ndarray  # [n, width]
  packing: PackingSettings
  width: int  # response columns (the none layout's; the longest response any layout holds)
  pad_id: int
  _layouts: dict = dataclasses.field(default_factory=dict)

  @classmethod
  def from_rollouts(cls, model_config: ModelConfig, rollouts: Rollouts, shaped: Shaped, prompts: Sequence[Prompt],
                    packing: PackingSettings, width: int, pad_id: int) -> "UpdateRows":
    """The slots `shaped.train` keeps; `prompts[g]` is prompt g of the rollouts' batch."""
    slots = np.flatnonzero(shaped.train)
    return cls(model_config, list(prompts), rollouts.prompt_index[slots], [rollouts.response(s) for s in slots],
               shaped.adv[slots], shaped.loss_mask[slots], shaped.kl_weights[slots], packing, width, pad_id)

  def __len__(self) -> int:
    return len(self.responses)

  def layout(self, idx: Sequence[int]) -> list[packing_lib.Rows]:
    """The micro-batches holding trajectories `idx`."""
    key = tuple(int(i) for i in idx)
    if key not in self._layouts:
      self._layouts[key] = packing_lib.layout(self.model_config, self.prompts, self.group, self.responses,
                                              self.pad_id, self.packing, seqs=key, width=self.width)
    return self._layouts[key]


def old_and_ref_logprobs(rows: UpdateRows, params: Any, ref_params: Any, temperature: float
                         ) -> tuple[np.ndarray, np.ndarray]:
  """log pi_old and log pi_ref of every response token, [n, width] each (float32, on the host).

  `ref_params` None: a LoRA policy's reference is its base, i.e. `params` with the adapters off (the
  model config without adapters), so no copy of the weights is kept."""
  ref_config = rows.model_config
  if ref_params is None:
    ref_params, ref_config = params, lora.base_config(rows.model_config)
  old = np.zeros((len(rows), rows.width), np.float32)
  ref = np.zeros_like(old)
  with sharding.mesh_context_of(params):
    for r in rows.layout(range(len(rows))):
      r.gather_into(old, sharding.to_host(score_tokens(rows.model_config, params, r.inputs, r.src, temperature)))
      r.gather_into(ref, sharding.to_host(score_tokens(ref_config, ref_params, r.inputs, r.src, temperature)))
  return old, ref


def mini_batches(group: np.ndarray, size: int, epochs: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
  """Trajectory indices of each mini-batch (one optimizer update): `epochs` passes, each over the groups in a
  shuffled order, a group's trajectories together, cut every `size` trajectories. Whole groups, so that a
  shared prompt is computed once per mini-batch and not once per trajectory (docs/design.md §10.5)."""
  group = np.asarray(group)
  for _ in range(epochs):
    order = np.concatenate([np.flatnonzero(group == g) for g in rng.permutation(np.unique(group))])
    for lo in range(0, len(order), size):
      yield order[lo:lo + size]


def micro_batches(rows: UpdateRows, mini: np.ndarray, old: np.ndarray, ref: np.ndarray,
                  settings: LossSettings) -> list[MicroBatch]:
  """The micro-batches of one mini-batch, each weighted by its share of the mini-batch loss: of its loss tokens
  (token_mean) or of its trajectories with loss tokens (seq_mean_token_mean), so that the weighted sum is the
  mini-batch's loss however the trajectories are laid out."""
  per_seq = rows.loss_mask.sum(1)
  mini = np.sort(np.asarray(mini))
  total = per_seq[mini].sum() if settings.loss_agg == "token_mean" else (per_seq[mini] > 0).sum()
  seq_weight = (1.0 / np.maximum(per_seq, 1)).astype(np.float32)
  out = []
  for r in rows.layout(mini):
    mask = r.scatter(rows.loss_mask, False)
    part = mask.sum() if settings.loss_agg == "token_mean" else (per_seq[r.sequences()] > 0).sum()
    batch = AepoBatch(r.inputs, r.src, old_logp=r.scatter(old), ref_logp=r.scatter(ref),
                      adv=r.scatter(rows.adv.astype(np.float32)), loss_mask=mask,
                      weights=r.scatter(rows.kl_weights.astype(np.float32)), seq_weight=r.scatter(seq_weight))
    out.append(MicroBatch(batch, settings, float(part / max(total, 1))))
  return out


def ppo_update(state: TrainState, ref_params: Any, updater: Updater, rows: UpdateRows, loss: LossSettings,
               ppo: PPOSettings, step: int, guard: run_control.SkipGuard | None = None
               ) -> tuple[TrainState, dict[str, float]]:
  """Old and reference log-probs, then PPO epochs over shuffled mini-batches (one optimizer update
  each) of micro-batches; metrics are the mean over the updates; `guard` sees every update's skip flag."""
  old, ref = old_and_ref_logprobs(rows, state.params, ref_params, loss.temperature)
  updates = []
  shuffle = np.random.default_rng([ppo.seed, step])
  for mini in mini_batches(rows.group, ppo.global_batch_size, ppo.epochs, shuffle):
    state, m = updater.update(state, micro_batches(rows, mini, old, ref, loss))
    if guard is not None:
      guard.observe(m["update_skipped"])
    updates.append(m)
  return state.replace(step=state.step + 1), {k: float(np.mean([m[k] for m in updates])) for k in updates[0]}
