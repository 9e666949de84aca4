"""Which sequences go into which update row, from lengths alone (numpy, no JAX): the settings of
`updates.packing` and the first-fit-decreasing fill that `train.packing` lays rows out by, so the memory
planner's step-time count (`step_time`, imported before JAX starts) packs exactly as the run does."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

PACKINGS = ("shared_prompt", "packed", "none")
# Longest sequences per shared_prompt row at most. Room for a group (a row shorter than a group repeats its
# prompt in each part), but not much more: attention's tiles do not follow segments, so a long row costs
# more than its segments. Gradient micro-steps of the CPU benchmark's batch (17,026 tokens, longest 1,536):
# one row of 12,288 per micro-batch 97.8 s, 4 x 3,072 73.6 s, rows of 4,608 (3 longest) 55.7 s.
ROW_SEQUENCES = 3
# The query and key tile of blockwise attention (models.blockwise_attention.DEFAULT_BLOCK; this module
# stays free of JAX, so the planner can import it before JAX starts)
ATTENTION_TILE = 512


def linear_flops_per_token(model: Any) -> float:
  """Forward flops a token spends in the decoder's matrix products and the LM head: 2 x their weights.
  `model`: anything with HF's text sizes (`config.model`, `models.TextConfig`)."""
  d, heads, kv = model.hidden_size, model.num_heads, model.num_kv_heads
  head_dim = d // heads
  layer = 2 * d * heads * head_dim + 2 * d * kv * head_dim + 3 * d * model.intermediate_size
  return 2.0 * (layer * model.num_layers + d * model.vocab_size)


def attention_flops_per_token(model: Any, row_tokens: int) -> float:
  """Forward flops a token of a row of `row_tokens` spends in attention (scores and the weighted sum,
  4 x width x keys per layer) when every tile of the row's causal triangle is computed, as blockwise
  attention does for a row whose segments share its tiles: the keys are the triangle's tiles' keys per query."""
  tile = min(ATTENTION_TILE, row_tokens)
  n = -(-row_tokens // tile)
  keys = n * (n + 1) / 2 * tile * tile / row_tokens
  return 4.0 * model.num_heads * (model.hidden_size // model.num_heads) * keys * model.num_layers


def sequences_per_row(model: Any, longest: int) -> int:
  """Longest sequences a shared_prompt row holds by default: the most, up to ROW_SEQUENCES, whose row's
  attention costs no more than a token's linear layers; one when even that does. Measured (gradient steps on
  a 2-core CPU): the tiny model (64 wide; 0.92 / 2.46 / 3.28 attention per linear flop at 1 / 2 / 3) took
  0.36 s a warm-start step at rows of 1 x 384, 1.10 at 2, 1.00 at 3; the 34M benchmark model (0.62 at 3)
  was fastest at 3; the 3B and 7B configs stay at 3 (under 0.35)."""
  for k in range(ROW_SEQUENCES, 1, -1):
    if attention_flops_per_token(model, k * longest) <= linear_flops_per_token(model):
      return k
  return 1


@dataclasses.dataclass(frozen=True)
class PackingSettings:
  """`config.updates` resolved for one stage (`from_config`): the layout and its sizes."""

  packing: str = "shared_prompt"
  row_tokens: int = 4096  # T of packed rows
  tokens_per_micro_batch: int = 32768  # packed, shared_prompt: rows per micro-batch ~ this // row_tokens
  micro_batch_size: int = 8  # none: rows per micro-batch
  batch_shards: int = 1  # devices the batch axis is split over (mesh data x fsdp): rows come in multiples

  def __post_init__(self):
    if self.packing not in PACKINGS:
      raise ValueError(f"config.updates.packing={self.packing!r}; choose one of {', '.join(PACKINGS)}")

  @classmethod
  def from_config(cls, config: Any, stage: str, batch_shards: int = 1) -> "PackingSettings":
    """`config.updates` for `stage` ("aepo": rollout lengths and aepo.micro_batch_size; "adacs": its response
    limit and micro-batch size) on a mesh whose batch axis spans `batch_shards` devices, zeros resolved: a
    micro-batch holds as many tokens as `micro_batch_size` rows of the stage's longest prompt + response
    (rounded up to 128); a packed row holds one such sequence; a shared_prompt row `sequences_per_row` of
    them (up to ROW_SEQUENCES, fewer for an attention-bound model), at most a device's share of the micro-batch."""
    u = config.get("updates") or {}
    response = config.adacs.max_response_length if stage == "adacs" else config.rollout.max_response_length
    longest = -(-(config.rollout.max_prompt_length + response) // 128) * 128
    micro = int(config.adacs.micro_batch_size if stage == "adacs" else config.aepo.micro_batch_size)
    packing = u.get("packing", "shared_prompt")
    budget = int(u.get("tokens_per_micro_batch", 0)) or micro * longest
    model = config.get("model")  # a config without one (planner tests) takes the most
    k = ROW_SEQUENCES if model is None else sequences_per_row(model, longest)
    share = max(longest, min(budget // batch_shards, k * longest) // 128 * 128)
    row_tokens = int(u.get("row_tokens", 0)) or (share if packing == "shared_prompt" else longest)
    return cls(packing=packing, row_tokens=row_tokens, tokens_per_micro_batch=budget, micro_batch_size=micro,
               batch_shards=batch_shards)

  @property
  def rows_per_micro_batch(self) -> int:
    """Rows of a full micro-batch: a multiple of `batch_shards` (a row count the batch axis cannot split
    would run whole on every device)."""
    if self.packing == "none":
      return self.micro_batch_size
    return max(self.batch_shards, self.tokens_per_micro_batch // self.row_tokens // self.batch_shards
               * self.batch_shards)

  def rows_for(self, n: int) -> int:
    """Rows of a micro-batch holding n filled ones: a power of two, then a multiple of `batch_shards`, so a
    step compiles a handful of shapes."""
    rows = min(self.rows_per_micro_batch, 1 << (n - 1).bit_length())
    return -(-rows // self.batch_shards) * self.batch_shards


@dataclasses.dataclass
class Item:
  """One prompt copy and the sequences whose responses follow it (packed: exactly one)."""

  prompt: int
  seqs: list[int]
  length: int


def items(prompt_lengths: Sequence[int], group: Sequence[int], response_lengths: Sequence[int],
          seqs: Sequence[int], s: PackingSettings) -> list[Item]:
  """Sequence i is prompt `group[i]` (of `prompt_lengths[group[i]]` tokens) + a response of
  `response_lengths[i]`. shared_prompt: a group's sequences follow one prompt copy while they fit a row."""
  out: list[Item] = []
  open_item: dict[int, Item] = {}  # shared_prompt: the group's item still being filled
  for i in seqs:
    g, n = int(group[i]), int(response_lengths[i])
    p = int(prompt_lengths[g])
    if p + n > s.row_tokens:
      raise ValueError(f"config.updates.row_tokens={s.row_tokens} is shorter than a prompt of {p} tokens with a "
                       f"response of {n}: raise it to at least the longest prompt + response")
    item = open_item.get(g) if s.packing == "shared_prompt" else None
    if item is not None and item.length + n <= s.row_tokens:
      item.seqs.append(i)
      item.length += n
    else:
      item = Item(g, [i], p + n)
      out.append(item)
      open_item[g] = item
  return out


def fill_rows(its: list[Item], capacity: int) -> list[list[Item]]:
  """First-fit decreasing bin packing (stable: equal lengths keep their order), the rows returned fullest
  first: `train.packing` cuts micro-batches from them in this order, each as wide as its fullest row, so the
  part-filled rows share the narrow micro-batches instead of widening every one (on the CPU benchmark's
  batch, packed rows of 1,536 then compute 1.09x the positions they need, not 1.16x)."""
  rows: list[list[Item]] = []
  free: list[int] = []
  for item in sorted(its, key=lambda it: -it.length):
    for r, room in enumerate(free):
      if item.length <= room:
        rows[r].append(item)
        free[r] -= item.length
        break
    else:
      rows.append([item])
      free.append(capacity - item.length)
  return [rows[r] for r in sorted(range(len(rows)), key=lambda r: free[r])]


def micro_batch_count(prompt_lengths: Sequence[int], group: Sequence[int], response_lengths: Sequence[int],
                      s: PackingSettings) -> int:
  """How many micro-batches `train.packing.layout` makes of these sequences."""
  n = len(response_lengths)
  if s.packing == "none":
    return math.ceil(n / s.micro_batch_size)
  rows = fill_rows(items(prompt_lengths, group, response_lengths, range(n), s), s.row_tokens)
  return math.ceil(len(rows) / s.rows_per_micro_batch)
