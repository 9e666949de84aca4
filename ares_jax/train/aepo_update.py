"""The train side of an AEPO step (design.md 5.9-5.10): loss settings and loss function, the reference
policy copy, old/reference log-probs, and the PPO mini-batches of micro-batches fed to `Updater`.

Every micro-batch is padded to `micro_batch_size` rows (copies of its first row with an empty loss
mask), so the jitted scoring and gradient programs compile once instead of once per size.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ares_jax import aepo, sharding
from ares_jax.models import lora
from ares_jax.models.config import ModelConfig
from ares_jax.data.batching import Prompt
from ares_jax.train.sequences import Packed, pack, response_logprobs, score
from ares_jax.train.update import LossFn, MicroBatch


@dataclasses.dataclass(frozen=True)
class LossSettings:
  """The static part of an AEPO micro-batch (hashable: a static argument of the compiled micro-step)."""

  prompt_width: int  # P of the packed rows (`sequences.pack`); responses start at column P
  temperature: float  # the rollout's: log-probs of the sampling distribution
  clip_low: float
  clip_high: float
  dual_clip: float | None  # None: off
  loss_agg: str  # token_mean | seq_mean_token_mean

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, prompt_width: int = 0) -> "LossSettings":
    a = config.aepo
    return cls(prompt_width, float(config.rollout.temperature), float(a.clip_low), float(a.clip_high),
               float(a.dual_clip) if a.dual_clip else None, a.loss_agg)


def aepo_loss_fn(model_config: ModelConfig) -> LossFn:
  """(params, arrays, LossSettings) -> (the AEPO loss of one micro-batch, its metrics)."""
  def loss(params, arrays, s: LossSettings):
    logp = response_logprobs(model_config, params, arrays["input_ids"], arrays["attention_mask"],
                             arrays["positions"], arrays["vision"], s.prompt_width, s.temperature,
                             dropout_key=arrays.get("dropout_key"))
    return aepo.aepo_loss(logp, arrays["old_logp"], arrays["ref_logp"], arrays["adv"], arrays["loss_mask"],
                          arrays["weights"], s.clip_low, s.clip_high, s.dual_clip, s.loss_agg)
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
  def from_rollouts(cls, model_config: ModelConfig, rollouts, shaped, prompts: Sequence[Prompt],
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
      args = (p.input_ids, p.attention_mask, p.positions, p.vision, p.prompt_width, temperature)
      old[idx] = np.asarray(sharding.to_host(score(rows.model_config, params, *args)))[:len(idx)]
      ref[idx] = np.asarray(sharding.to_host(score(ref_config, ref_params, *args)))[:len(idx)]
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
    arrays = dict(input_ids=p.input_ids, attention_mask=p.attention_mask, positions=p.positions, vision=p.vision,
                  old_logp=rows.padded(old[idx]), ref_logp=rows.padded(ref[idx]), adv=rows.padded(rows.adv[idx]),
                  loss_mask=mask, weights=rows.padded(rows.kl_weights[idx]))
    share = mask.sum() / max(tokens, 1) if settings.loss_agg == "token_mean" else n / len(mini)
    out.append(MicroBatch(arrays, dataclasses.replace(settings, prompt_width=p.prompt_width), float(share)))
  return out
