"""Sampling settings and the rollout record the sampler returns."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to decode. Hashable: it is a static argument of the compiled sampler.

  temperature 0.0 is greedy; `n` samples per prompt; `window` is w of the window entropy
  (docs/design.md §5.1); `max_branches` forks per prompt when a threshold is given (None: n // 2);
  `eos_ids` end a trajectory (the EOS token is kept and counted in `length`). `suppress_ids` are
  never sampled (None: the model's vision placeholder tokens, which would otherwise be taken for
  image slots when the rollout is scored again with `models.forward`); their probability still
  counts in log-probs and entropy, which are always those of the full distribution.
  """

  max_new_tokens: int = 256
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  n: int = 1
  window: int = 4
  max_branches: int | None = None
  eos_ids: tuple[int, ...] = ()
  suppress_ids: tuple[int, ...] | None = None
  pad_id: int = 0
  cache_dtype: str | None = None  # None: the model's compute dtype; "bfloat16" halves cache memory
  prompt_bucket: int = 64  # prompts are left-padded to a multiple of this (few compiled shapes)
  track_entropy: bool = True  # entropy / window entropy / HWE bookkeeping (off only for benchmarks)
  chunk_prompts: int = 0  # prompts per compiled rollout call (0: all at once); results do not depend on it
  # LoRA policies: decode over per-layer weights with the adapters merged in (made once per call, in the
  # per-layer copy decoding makes anyway) or apply them unmerged at every step (benchmarks/lora_decode.py)
  lora_merged: bool = True
  # The KV layout (README "How rollouts are decoded"): "paged" (each prompt's KV once per group, responses
  # in pages of `page_size` tokens, copy-on-write forks, ended groups refilled from the call's queue with
  # `prompts_in_flight` groups decoding; 0: all of the call's prompts) or "dense" (a full row per slot,
  # the prompt copied into each; the reference engine). Results are the same either way.
  kv_cache: str = "paged"
  page_size: int = 64
  prompts_in_flight: int = 0
  # Paged: once no prompt waits, whenever at most half the groups in flight still decode they are moved
  # into half as many (the tail of a call costs what it decodes), at most this many times per call; each
  # size is one more compiled decode program. 0: the call's last groups decode at full width.
  drain_halvings: int = 3
  # Paged decode attention (`paged.py`): "per_group" reads each group's response pages once for all of its
  # slots (fewest bytes; scores cost G times a slot's flops: for accelerators, bound by memory bandwidth),
  # "per_slot" gathers each slot's own pages (a slot's flops; for CPUs, bound by compute); "auto" picks by
  # the platform the call runs on. Results are the same either way.
  decode_attention: str = "auto"

  def __post_init__(self):
    checks = {
        "max_new_tokens": self.max_new_tokens >= 1, "temperature": self.temperature >= 0,
        "top_p": 0 < self.top_p <= 1, "top_k": self.top_k >= 0, "n": self.n >= 1, "window": self.window >= 1,
        "max_branches": self.max_branches is None or self.max_branches >= 0,
        "chunk_prompts": self.chunk_prompts >= 0, "kv_cache": self.kv_cache in ("paged", "dense"),
        "page_size": self.page_size >= 1, "prompts_in_flight": self.prompts_in_flight >= 0,
        "drain_halvings": self.drain_halvings >= 0,
        "decode_attention": self.decode_attention in ("auto", "per_group", "per_slot"),
    }
    for field, ok in checks.items():
      if not ok:
        raise ValueError(f"SamplingConfig.{field}={getattr(self, field)!r} is out of range")
    object.__setattr__(self, "eos_ids", tuple(int(e) for e in np.atleast_1d(self.eos_ids)))
    if self.suppress_ids is not None:
      object.__setattr__(self, "suppress_ids", tuple(int(e) for e in np.atleast_1d(self.suppress_ids)))

  def for_platform(self, platform: str) -> SamplingConfig:
    """This config with `decode_attention="auto"` made the choice for `platform` (a jax device platform):
    per_slot on CPUs, per_group elsewhere."""
    if self.decode_attention != "auto":
      return self
    return dataclasses.replace(self, decode_attention="per_slot" if platform == "cpu" else "per_group")

  def branches(self, branching: bool) -> int:
    if not branching:
      return 0
    return self.n // 2 if self.max_branches is None else self.max_branches


@dataclasses.dataclass(frozen=True)
class Rollouts:
  """Trajectories of one `generate` call; S slots = prompts * (n + branches), N = max_new_tokens.

  Slot g*(n+b) + i holds sample i of prompt g (i < n) or its branches (i >= n); unused branch slots
  have length 0. `window_entropy[s, t]` is the mean entropy of tokens t..t+w-1, valid where
  `window_valid`; `hwe` marks valid windows with window_entropy >= tau_high. A branch shares its
  parent's tokens before `fork_pos` and was sampled on its own from there.
  """

  tokens: np.ndarray  # [S, N] int32 (pad_id past length)
  logprobs: np.ndarray  # [S, N] float32
  entropy: np.ndarray  # [S, N] float32
  window_entropy: np.ndarray  # [S, N] float32 (0 where not valid)
  window_valid: np.ndarray  # [S, N] bool
  hwe: np.ndarray  # [S, N] bool
  length: np.ndarray  # [S] int32
  prompt_index: np.ndarray  # [S] int32
  parent: np.ndarray  # [S] int32, -1 = root
  fork_pos: np.ndarray  # [S] int32, -1 = root

  @property
  def mask(self) -> np.ndarray:
    """[S, N] bool: positions holding generated tokens."""
    return np.arange(self.tokens.shape[1])[None, :] < self.length[:, None]

  def response(self, s: int) -> np.ndarray:
    """The generated tokens of slot `s` (EOS included when it stopped on one)."""
    return self.tokens[s, :self.length[s]]

  @property
  def used(self) -> np.ndarray:
    """[S] bool: slots that hold a trajectory (roots, and branches that were forked)."""
    return self.length > 0

  def texts(self, tokenizer) -> tuple[np.ndarray, list[str]]:
    """The used slots and their responses decoded (special tokens dropped), ready for grading against
    the answer of `prompt_index[slots]`."""
    slots = np.flatnonzero(self.used)
    return slots, tokenizer.batch_decode([self.response(s).tolist() for s in slots], skip_special_tokens=True)
