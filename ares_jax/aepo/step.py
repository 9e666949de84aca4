"""One AEPO step after the rollouts are graded (docs/design.md §5.2-5.10): from trajectories and their accuracy to
an optimizer update, on top of the pure math of this package.

    shaped = shape_batch(rollouts, accuracy, fmt, shaping, prev_tau, prev_ema, triggers)   # §5.2-5.9, host
    rows = UpdateRows.from_rollouts(mcfg, rollouts, shaped, prompts, micro_batch_size, width, pad_id)
    state, metrics = ppo_update(state, ref_params, updater, rows, loss, ppo, step, guard)   # §5.10

`shape_batch`: tau_high, N_HE, difficulty bins, hierarchical rewards (+ format), GRPO advantages, the online
filter, KL weights and the loss masks (a branch trains from its fork on). `ppo_update`: old and reference
log-probs of the kept trajectories, then `ppo.epochs` shuffled passes of mini-batches (one optimizer update
each, `train.update.Updater`) of micro-batches, each weighted by its share of the mini-batch loss.

Every micro-batch is padded to `micro_batch_size` rows (copies of its first row with an empty loss mask),
so the jitted scoring and gradient programs compile once instead of once per size.
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
from ares_jax.train.sequences import Packed, pack, response_logprobs, score
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

  prompt_width: int = 0  # P of the packed rows (`sequences.pack`); responses start at column P
  temperature: float  # the rollout's: log-probs of the sampling distribution
  clip_low: float
  clip_high: float
  dual_clip: float | None  # None: off
  loss_agg: str  # token_mean | seq_mean_token_mean


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOSettings:
  """How one rollout batch is trained on: `epochs` passes of mini-batches of `global_batch_size` rows."""

  global_batch_size: int
  micro_batch_size: int
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
  """One AEPO micro-batch: prompt + response rows and, per response token, what the loss weighs it by."""

  inputs: ModelInputs  # [B, P + R] rows (`sequences.pack`)
  old_logp: jax.Array  # [B, R] log pi_old (the rollout policy)
  ref_logp: jax.Array  # [B, R] log pi_ref
  adv: jax.Array  # [B] advantages
  loss_mask: jax.Array  # [B, R] bool: tokens trained on (padding rows: none)
  weights: jax.Array  # [B, R] beta_it


def aepo_loss_fn(model_config: ModelConfig) -> LossFn:
  """(params, AepoBatch, LossSettings, dropout key) -> (the AEPO loss of one micro-batch, its metrics)."""
  def loss(params, batch: AepoBatch, s: LossSettings, dropout_key=None):
    logp = response_logprobs(model_config, params, batch.inputs, s.prompt_width, s.temperature,
                             dropout_key=dropout_key)
    return aepo.aepo_loss(logp, batch.old_logp, batch.ref_logp, batch.adv, batch.loss_mask, batch.weights,
                          clip_low=s.clip_low, clip_high=s.clip_high, dual_clip=s.dual_clip, loss_agg=s.loss_agg)
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
  """The trajectories one RL step trains on, with their advantages, loss masks and KL weights; packed
  (prompt + response) into micro-batches of `micro_batch_size` rows on demand, each pack made once."""

  model_config: ModelConfig
  prompts: Sequence[Prompt]
  responses: Sequence[np.ndarray]
  adv: np.ndarray  # [n]
  loss_mask: np.ndarray  # [n, width] bool
  kl_weights: np.ndarray  # [n, width]
  micro_batch_size: int
  width: int  # response columns of every pack
  pad_id: int
  _packs: dict = dataclasses.field(default_factory=dict)

  @classmethod
  def from_rollouts(cls, model_config: ModelConfig, rollouts: Rollouts, shaped: Shaped, prompts: Sequence[Prompt],
                    micro_batch_size: int, width: int, pad_id: int) -> "UpdateRows":
    """The slots `shaped.train` keeps; `prompts[g]` is prompt g of the rollouts' batch."""
    slots = np.flatnonzero(shaped.train)
    return cls(model_config, [prompts[rollouts.prompt_index[s]] for s in slots],
               [rollouts.response(s) for s in slots], shaped.adv[slots], shaped.loss_mask[slots],
               shaped.kl_weights[slots], micro_batch_size, width, pad_id)

  def __len__(self) -> int:
    return len(self.prompts)

  def packed(self, idx: Sequence[int]) -> Packed:
    key = tuple(idx)
    if key not in self._packs:
      full = self.padded(list(idx))
      self._packs[key] = pack(self.model_config, [self.prompts[i] for i in full],
                              [self.responses[i] for i in full], self.pad_id, response_width=self.width)
    return self._packs[key]

  def padded(self, x):
    """`x` (a list or array of rows) padded to micro_batch_size rows with copies of its first."""
    extra = self.micro_batch_size - len(x)
    if isinstance(x, list):
      return x + x[:1] * extra
    return np.concatenate([x, np.repeat(x[:1], extra, axis=0)]) if extra > 0 else x


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
  mb = rows.micro_batch_size
  with sharding.mesh_context_of(params):
    for lo in range(0, len(rows), mb):
      idx = list(range(lo, min(lo + mb, len(rows))))
      p = rows.packed(idx)
      old[idx] = np.asarray(sharding.to_host(score(rows.model_config, params, p.inputs, p.prompt_width,
                                                   temperature)))[:len(idx)]
      ref[idx] = np.asarray(sharding.to_host(score(ref_config, ref_params, p.inputs, p.prompt_width,
                                                   temperature)))[:len(idx)]
  return old, ref


def mini_batches(n: int, size: int, epochs: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
  """Row indices of each mini-batch (one optimizer update): `epochs` shuffled passes over n rows."""
  for _ in range(epochs):
    order = rng.permutation(n)
    for lo in range(0, n, size):
      yield order[lo:lo + size]


def micro_batches(rows: UpdateRows, mini: np.ndarray, old: np.ndarray, ref: np.ndarray,
                  settings: LossSettings) -> list[MicroBatch]:
  """The micro-batches of one mini-batch, each weighted by its share of the mini-batch loss: of its
  loss tokens (token_mean) or of its sequences (seq_mean_token_mean)."""
  mb = rows.micro_batch_size
  tokens = rows.loss_mask[mini].sum()
  out = []
  for j in range(0, len(mini), mb):
    idx = sorted(mini[j:j + mb].tolist())
    n = len(idx)
    p = rows.packed(idx)
    mask = np.zeros((mb, rows.width), bool)
    mask[:n] = rows.loss_mask[idx]
    batch = AepoBatch(p.inputs, old_logp=rows.padded(old[idx]), ref_logp=rows.padded(ref[idx]),
                      adv=rows.padded(rows.adv[idx]), loss_mask=mask, weights=rows.padded(rows.kl_weights[idx]))
    share = mask.sum() / max(tokens, 1) if settings.loss_agg == "token_mean" else n / len(mini)
    out.append(MicroBatch(batch, dataclasses.replace(settings, prompt_width=p.prompt_width), float(share)))
  return out


def ppo_update(state: TrainState, ref_params: Any, updater: Updater, rows: UpdateRows, loss: LossSettings,
               ppo: PPOSettings, step: int, guard: run_control.SkipGuard | None = None
               ) -> tuple[TrainState, dict[str, float]]:
  """Old and reference log-probs, then PPO epochs over shuffled mini-batches (one optimizer update
  each) of micro-batches; metrics are the mean over the updates; `guard` sees every update's skip flag."""
  old, ref = old_and_ref_logprobs(rows, state.params, ref_params, loss.temperature)
  updates = []
  shuffle = np.random.default_rng([ppo.seed, step])
  for mini in mini_batches(len(rows), ppo.global_batch_size, ppo.epochs, shuffle):
    state, m = updater.update(state, micro_batches(rows, mini, old, ref, loss))
    if guard is not None:
      guard.observe(m["update_skipped"])
    updates.append(m)
  return state.replace(step=state.step + 1), {k: float(np.mean([m[k] for m in updates])) for k in updates[0]}
