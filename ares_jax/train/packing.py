"""How prompt + response sequences are laid out in rows for scoring and training (docs/design.md §10.5).

Three layouts, `updates.packing`:

  none           one sequence per row, [left pad | prompt | response | right pad]: prompts as wide as the
                 micro-batch's longest, every response `width` wide, `micro_batch_size` rows per micro-batch.
                 The reference the other two are tested against.
  packed         sequences end to end in rows of `row_tokens` tokens, each its own attention segment whose
                 M-RoPE positions start at 0; micro-batches of `tokens_per_micro_batch // row_tokens` rows.
  shared_prompt  as packed, but the responses of one prompt follow ONE copy of it: each response attends to
                 the whole prompt (`ModelInputs.prefix`) and causally to itself only, its positions continue
                 from the prompt's end, and the vision tower sees the prompt's images once. A group longer
                 than a row is split over rows, each part with its own copy of the prompt.

The function is the same in every layout: a response token sees the same prompt and response tokens at the
same positions, so log-probs, losses and gradients agree to rounding (tests/test_packing.py). Every layout
gives `Rows`: the model inputs [B, T] and, for each response token, where it came from (`seq`, `col`) and
which column's logits predict it (`src`: the previous column, or for a shared prompt's responses the
prompt's last column). Rows are packed first-fit decreasing and cut into micro-batches fullest first, so the
part-filled rows share the narrow micro-batches; a micro-batch's row count is rounded up to a power of two and
its row width to a shape bucket (`positions.bucket`: 12.5% steps), so a step compiles a handful of programs and
a part-filled micro-batch does not cost a full one.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

import numpy as np

from ares_jax.data.batching import Prompt, media, round_up
from ares_jax.models import positions as pos_lib
from ares_jax.models.config import ModelConfig
from ares_jax.models.qwen25vl import ModelInputs, media_positions, media_vision
from ares_jax.train import row_fill
from ares_jax.train.row_fill import PackingSettings
from ares_jax.train.sequences import pack

NO_PREFIX = -2  # `ModelInputs.prefix` of tokens that attend to no shared prompt (never a segment id)


@dataclasses.dataclass
class Rows:
  """One micro-batch's host arrays, and where each response token of the caller's sequences sits in it."""

  inputs: ModelInputs  # ids, mask (segment ids), positions [3, B, T], vision, prefix (shared_prompt) [B, T]
  src: np.ndarray  # [B, T] int32: the column whose logits predict the token here (0 where nothing is scored)
  seq: np.ndarray  # [B, T] int32: the caller's index of the sequence whose response token sits here, else -1
  col: np.ndarray  # [B, T] int32: that token's index in its response, else -1

  @property
  def scored(self) -> np.ndarray:
    return self.seq >= 0

  def sequences(self) -> np.ndarray:
    """The caller's indices of the sequences in these rows (sorted)."""
    return np.unique(self.seq[self.scored])

  def scatter(self, values: np.ndarray, fill=0) -> np.ndarray:
    """Per-sequence values [n] or per-response-token values [n, W] of the caller's sequences -> [B, T]."""
    values = np.asarray(values)
    out = np.full(self.seq.shape, fill, values.dtype)
    s, c = self.seq[self.scored], self.col[self.scored]
    out[self.scored] = values[s] if values.ndim == 1 else values[s, c]
    return out

  def gather_into(self, out: np.ndarray, values: np.ndarray) -> None:
    """Writes row values [B, T] of the scored tokens into `out` [n, W] at (sequence, column)."""
    out[self.seq[self.scored], self.col[self.scored]] = np.asarray(values)[self.scored]

  def tokens(self) -> tuple[int, int]:
    """(token positions computed, response tokens scored)."""
    return int(self.seq.size), int(self.scored.sum())


def layout(config: ModelConfig, prompts: Sequence[Prompt], group: Sequence[int], responses: Sequence[np.ndarray],
           pad_id: int, s: PackingSettings, *, seqs: Sequence[int] | None = None, width: int | None = None,
           min_windows: int = 1) -> list[Rows]:
  """The micro-batches of sequences `seqs` (default all): sequence i is prompt `prompts[group[i]]` followed
  by `responses[i]`; `group` also says which sequences share a prompt. `width`: the response columns of the
  none layout (default: the longest response, rounded up to 16)."""
  seqs = list(range(len(responses))) if seqs is None else [int(i) for i in seqs]
  if not seqs:
    return []
  if s.packing == "none":
    width = width or round_up(max(len(responses[i]) for i in seqs), 16)
    mb = s.micro_batch_size
    return [_padded_rows(config, prompts, group, responses, seqs[lo:lo + mb], mb=mb, pad_id=pad_id, width=width,
                         min_windows=min_windows) for lo in range(0, len(seqs), mb)]
  its = row_fill.items([len(p.ids) for p in prompts], group, [len(r) for r in responses], seqs, s)
  return [_packed_rows(config, prompts, responses, part, n_rows=s.rows_for(len(part)), t=_width(part, s),
                       packing=s.packing, pad_id=pad_id, min_windows=min_windows)
          for part in _micro_batches(row_fill.fill_rows(its, s.row_tokens), s)]


def _width(part: list[list[row_fill.Item]], s: PackingSettings) -> int:
  """A micro-batch's row width: its fullest row's shape bucket, not the whole row."""
  return min(s.row_tokens, pos_lib.bucket(max(sum(it.length for it in row) for row in part)))


def _micro_batches(rows: list[list[row_fill.Item]], s: PackingSettings) -> list[list[list[row_fill.Item]]]:
  """Rows (fullest first) cut into runs of `rows_per_micro_batch`, each micro-batch as wide as its first row.
  A part-filled micro-batch goes where the batch computes the fewest positions: after the widest rows when
  its few rows would otherwise set a wide micro-batch's width for the full ones, before them when it has
  fewer rows to pay their width with (on the CPU benchmark's shared_prompt rows, 18,944 positions instead of
  19,456). It runs last either way, so the first micro-batch is a full one (the memory plan compiles it)."""
  per = s.rows_per_micro_batch
  full, rest = divmod(len(rows), per)
  best = None
  for k in range(full, -1, -1) if rest else [full]:  # the part-filled one after k full ones; ties: last
    cuts = [0, *itertools.accumulate([per] * k + [rest] * bool(rest) + [per] * (full - k))]
    parts = [rows[lo:hi] for lo, hi in zip(cuts, cuts[1:])]
    cost = sum(s.rows_for(len(part)) * _width(part, s) for part in parts)
    if best is None or cost < best[0]:
      best = cost, [part for part in parts if len(part) == per] + [part for part in parts if len(part) < per]
  return best[1]


# ----------------------------------------------------------------------------------------- packed rows

def prompt_positions(config: ModelConfig, prompt: Prompt) -> tuple[np.ndarray, int]:
  """A prompt's M-RoPE positions [3, p] on its own, and the position its first response token takes."""
  ids = np.asarray(prompt.ids)[None]
  pos = media_positions(config, ids, np.ones_like(ids), media([prompt]))
  return pos[:, 0], int(pos.max()) + 1


def _packed_rows(config, prompts, responses, rows: list[list[row_fill.Item]], *, n_rows: int, t: int, packing: str,
                 pad_id: int, min_windows: int) -> Rows:
  ids = np.full((n_rows, t), pad_id, np.int32)
  mask = np.zeros((n_rows, t), np.int32)
  positions = np.zeros((3, n_rows, t), np.int32)
  prefix = np.full((n_rows, t), NO_PREFIX, np.int32)
  src = np.zeros((n_rows, t), np.int32)
  seq = np.full((n_rows, t), -1, np.int32)
  col = np.full((n_rows, t), -1, np.int32)
  with_media = []  # prompts in the order of their tokens, row-major: how `Qwen25VL.embed` places features
  shared = packing == "shared_prompt"
  placed: dict[int, tuple[np.ndarray, int]] = {}
  for r, items in enumerate(rows):
    c, segment = 0, 0
    for item in items:
      prompt = prompts[item.prompt]
      p = len(prompt.ids)
      if item.prompt not in placed:
        placed[item.prompt] = prompt_positions(config, prompt)
      pos, start = placed[item.prompt]
      segment += 1
      prompt_segment = segment
      ids[r, c:c + p], mask[r, c:c + p], positions[:, r, c:c + p] = prompt.ids, segment, pos
      with_media.append(prompt)
      last = c + p - 1
      c += p
      for k, i in enumerate(item.seqs):
        resp = np.asarray(responses[i])
        n = len(resp)
        if shared:  # a segment of its own that also sees the prompt's
          segment += 1
          prefix[r, c:c + n] = prompt_segment
        ids[r, c:c + n], mask[r, c:c + n] = resp, segment
        positions[:, r, c:c + n] = start + np.arange(n)
        src[r, c:c + n] = np.arange(c - 1, c + n - 1)
        src[r, c] = last  # a shared prompt's responses all follow its last token
        seq[r, c:c + n], col[r, c:c + n] = i, np.arange(n)
        c += n
  vision = media_vision(config, media(with_media), min_windows)
  return Rows(ModelInputs(ids, positions, mask, vision, prefix if shared else None), src, seq, col)


# ----------------------------------------------------------------------------------------- padded rows

def _padded_rows(config, prompts, group, responses, seqs, *, mb, pad_id, width, min_windows) -> Rows:
  """The none layout (`sequences.pack`): `mb` rows, copies of the first sequence (scoring nothing) filling a
  short micro-batch."""
  full = seqs + seqs[:1] * (mb - len(seqs))
  if max(len(responses[i]) for i in full) > width:
    raise ValueError(f"a response is longer than the update rows' {width} response columns")
  p = pack(config, [prompts[group[i]] for i in full], [responses[i] for i in full], pad_id, response_width=width,
           min_windows=min_windows)
  b, t = p.inputs.ids.shape
  seq = np.full((b, t), -1, np.int32)
  col = np.full((b, t), -1, np.int32)
  for row, i in enumerate(seqs):
    n = len(responses[i])
    seq[row, p.prompt_width:p.prompt_width + n], col[row, p.prompt_width:p.prompt_width + n] = i, np.arange(n)
  src = np.broadcast_to(np.maximum(np.arange(t) - 1, 0), (b, t)).astype(np.int32)
  return Rows(p.inputs, src, seq, col)
