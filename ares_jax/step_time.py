"""A predicted step time from a memory plan: each program's time per call x its calls per training step.

The plan (`memory_plan.plan_step`) gives every program's per-device flops and bytes accessed (XLA's cost
analysis); `chips.Device` gives the peak rates. Per call:

  roofline = max(flops / peak_flops, bytes / hbm_bandwidth)
  at_mfu   = max(flops / (peak_flops x plan.mfu), bytes / hbm_bandwidth)

(compute-bound programs at the assumed utilisation, memory-bound ones at their bandwidth bound), and a
stage's step is the sum over its programs of calls x time per call, at the expected lengths
`plan.prompt_tokens` (image tokens included) and `plan.response_tokens`. A step is one of `total_steps`:
for AEPO a rollout batch and all its optimizer updates (`ppo_epochs` x its mini-batches), for AdaCS one SFT
optimizer step (its pass-rate rollouts run before training and are not part of it).

What the figures are not: a loop that stops on its data is counted once (the cost analysis counts every
loop body once; `hlo_cost` restores only loops of known trip count, such as the scanned layers), so the
decode programs' cost columns are one decode step, multiplied here by an estimate of the steps; the paged engine's step is costed at half the response
budget live, whatever `plan.response_tokens`; communication, launch gaps and what XLA's cost model does not
see (Pallas kernels) are left out. Nothing here imports JAX: it reads the plan's rows (`ProgramPlan.row`).
"""

from __future__ import annotations

import math
from typing import Any, Optional

from ares_jax import chips
from ares_jax.train import row_fill
from ares_jax.train.row_fill import PackingSettings


def _micro_batches(first: int, count: int, per_prompt: int, s: PackingSettings, p: int, r: int) -> int:
  """Micro-batches `train.packing` makes of trajectories first .. first + count - 1 (groups of `per_prompt`
  in order, as `aepo.step.mini_batches` cuts them), each a prompt of p tokens and a response of r."""
  group = [j // per_prompt for j in range(first, first + count)]
  prompt_lengths = [p] * (group[-1] + 1)
  return row_fill.micro_batch_count(prompt_lengths, group, [r] * count, s)


def batch_shards(config: Any, n_devices: int) -> int:
  """Devices the batch axis spans on `n_devices` laid out as `config.mesh` (data x fsdp; -1: the rest)."""
  sizes = {k: int(config.mesh[k]) for k in ("data", "fsdp", "tensor")}
  known = math.prod(v for v in sizes.values() if v != -1)
  sizes = {k: (n_devices // known if v == -1 else v) for k, v in sizes.items()}
  return sizes["data"] * sizes["fsdp"]


def update_calls(config: Any, shards: int = 1) -> dict[str, Any]:
  """Calls per training step of the scoring and update programs: the micro-batches `train.packing` makes at
  the expected lengths (`plan.prompt_tokens`, `plan.response_tokens` up to the stage's
  `max_response_length`) in the layout `config.updates` names (`row_fill.PackingSettings.from_config`). AEPO
  trains on rollout.prompts_per_step x rollout.n trajectories (branches and the online filter aside): old and
  reference log-probs score them once; the gradient micro-step runs over every mini-batch
  (`aepo.global_batch_size` trajectories of whole groups, the last one the remainder) of every epoch, and the
  optimizer apply once per mini-batch. AdaCS: one optimizer step of `adacs.batch_size` examples.

  Returns {"packing": str, "aepo": {"trajectories", "mini_batches", "scoring", "micro_step", "apply"},
  "sft": {"micro_step", "apply"}} (counts; "mini_batches" is per epoch). `shards`: devices the batch axis
  spans (rows come in multiples of it)."""
  c = config
  a, r = c.aepo, c.rollout
  s = PackingSettings.from_config(c, "aepo", shards)
  p, resp = prompt_tokens(c), response_tokens(c)
  trajectories = r.prompts_per_step * r.n
  starts = range(0, trajectories, a.global_batch_size)
  sizes = [min(a.global_batch_size, trajectories - lo) for lo in starts]
  micro = sum(_micro_batches(lo, n, r.n, s, p, resp) for lo, n in zip(starts, sizes))
  ad = c.adacs
  sft = _micro_batches(0, ad.batch_size, 1, PackingSettings.from_config(c, "adacs", shards), p,
                       min(c.plan.response_tokens, ad.max_response_length))
  return {"packing": s.packing,
          "aepo": {"trajectories": trajectories, "mini_batches": len(sizes),
                   "scoring": _micro_batches(0, trajectories, r.n, s, p, resp),
                   "micro_step": c.ppo_epochs * micro, "apply": c.ppo_epochs * len(sizes)},
          "sft": {"micro_step": sft, "apply": 1}}


def _unit(config: Any, stage: str, shards: int) -> str:
  """What a micro-batch holds, for the counts' explanations."""
  s = PackingSettings.from_config(config, stage, shards)
  if s.packing == "none":
    return f"{s.micro_batch_size} rows"
  most = config.adacs.max_response_length if stage == "adacs" else config.rollout.max_response_length
  r = min(config.plan.response_tokens, most)
  return (f"{s.rows_per_micro_batch} rows of {s.row_tokens} tokens ({s.packing}; {prompt_tokens(config)} + {r} "
          "a trajectory)")


def prompt_tokens(config: Any) -> int:
  """The expected prompt: `plan.prompt_tokens`, at most `rollout.max_prompt_length` (update rows hold no more)."""
  return min(config.plan.prompt_tokens, config.rollout.max_prompt_length)


def response_tokens(config: Any) -> int:
  """The expected AEPO response: `plan.response_tokens`, at most `rollout.max_response_length`."""
  return min(config.plan.response_tokens, config.rollout.max_response_length)


def program_calls(config: Any, row: dict[str, Any], updates: dict[str, Any], shards: int = 1
                  ) -> tuple[str, int, str]:
  """(stage, calls per step, how they were counted) of one plan row, by its name; stage "other" with 0
  calls for a program this module does not know (it is listed, not counted)."""
  name, r, a = row["name"], config.rollout, config.aepo
  prompts = r.prompts_per_step
  unit = _unit(config, "aepo", shards)
  aepo, sft = updates["aepo"], updates["sft"]
  minis = f"{config.ppo_epochs} epoch(s) x {aepo['mini_batches']} mini-batches of <= {a.global_batch_size} trajectories"
  waves = lambda per_call: math.ceil(prompts / max(per_call, 1))
  if name.startswith("pass-rate rollout"):
    return "adacs", 0, "pass-rate rollouts run before SFT, not in its step"
  if "restore" in name:
    return ("adacs" if name.startswith("SFT") else "aepo"), 0, "at a restart, not per step"
  if name.startswith("SFT gradient micro-step"):
    ad = config.adacs
    return "adacs", sft["micro_step"], (f"{ad.batch_size} examples in micro-batches of "
                                        f"{_unit(config, 'adacs', shards)}")
  if name.startswith("SFT optimizer apply"):
    return "adacs", sft["apply"], "one per step"
  if name.startswith("decode weights"):
    return "aepo", 1, "one generate call per step"
  if name.startswith("rollout: prefill"):
    n = row["prompts_per_call"]
    return "aepo", waves(n), f"ceil({prompts} prompts / {n} per call)"
  if name.startswith("rollout: paged decode loop"):
    n, t = row["groups_in_flight"], response_tokens(config)
    return "aepo", waves(n) * t, f"ceil({prompts} prompts / {n} groups in flight) x {t} response tokens"
  if name.startswith("rollout chunk"):  # the dense engine's figures: prefill + one decode step
    n, t = row["prompts_per_call"], response_tokens(config)
    return "aepo", waves(n) * t, f"ceil({prompts} prompts / {n} per call) x {t} response tokens (prefill included)"
  if name.startswith(("old log-probs", "reference log-probs")):
    return "aepo", aepo["scoring"], f"{aepo['trajectories']} trajectories in micro-batches of {unit}"
  if name.startswith("AEPO gradient micro-step"):
    return "aepo", aepo["micro_step"], f"{minis}, in micro-batches of {unit}"
  if name.startswith("AEPO optimizer apply"):
    return "aepo", aepo["apply"], minis
  return "other", 0, "unknown program: not counted"


def per_call(row: dict[str, Any], device: Optional[chips.Device], mfu: float) -> tuple[Optional[float], ...]:
  """(roofline, at_mfu) seconds of one call of a row's program; (None, None) without figures or a device."""
  flops, moved = row.get("flops"), row.get("bytes_accessed")
  if device is None or flops is None or moved is None:
    return None, None
  memory = moved / device.hbm_bandwidth
  return max(flops / device.peak_flops, memory), max(flops / (device.peak_flops * mfu), memory)


def step_seconds(config: Any, rows: list[dict[str, Any]], device: Optional[chips.Device], shards: int = 1
                 ) -> dict[str, Any]:
  """Per stage of the plan ("aepo", "adacs"; "other" for unknown programs): {"roofline": s, "at_mfu": s,
  "programs": [{"name", "calls", "how", "roofline_s", "at_mfu_s"}]}, the times per call; a stage's totals
  are None when a program it calls has no figures or there is no device (cpu:N). `shards`: devices the
  batch axis spans (`batch_shards`)."""
  updates = update_calls(config, shards)
  out: dict[str, Any] = {}
  for row in rows:
    stage, calls, how = program_calls(config, row, updates, shards)
    roof, at_mfu = per_call(row, device, config.plan.mfu)
    s = out.setdefault(stage, {"roofline": 0.0, "at_mfu": 0.0, "programs": []})
    s["programs"].append({"name": row["name"], "calls": calls, "how": how, "roofline_s": roof, "at_mfu_s": at_mfu})
    if calls == 0 or stage == "other":
      continue
    for key, t in (("roofline", roof), ("at_mfu", at_mfu)):
      s[key] = None if t is None or s[key] is None else s[key] + calls * t
  return out


def format_lines(config: Any, steps: dict[str, Any], device: Optional[chips.Device]) -> list[str]:
  """One line per stage (the predicted seconds per step and the calls behind them), then what they assume."""
  p = config.plan
  lines = []
  for stage, s in steps.items():
    calls = ", ".join(f"{q['name']} x{q['calls']:,}" for q in s["programs"] if q["calls"])
    if stage == "other":
      lines.append("not counted (no call count known): " + ", ".join(q["name"] for q in s["programs"]))
    elif s["roofline"] is None:
      why = "no peak figures for these devices (chips.py)" if device is None else "a program has no cost figures"
      lines.append(f"predicted {stage} step: no prediction ({why}); calls per step: {calls}")
    else:
      lines.append(f"predicted {stage} step: {_seconds(s['roofline'])} at the roofline, {_seconds(s['at_mfu'])} at "
                   f"{p.mfu:.0%} MFU; calls per step: {calls}")
  lines.append(f"Step time: sum of calls x time per call at {prompt_tokens(config)} prompt + "
               f"{response_tokens(config)} response tokens (plan.prompt_tokens, plan.response_tokens up to "
               "rollout.max_prompt_length, max_response_length); "
               "decode loop calls = ceil(prompts / groups in flight) x response tokens, each a decode step (a loop "
               "that stops on its data is costed as one run of its body); at MFU = compute at plan.mfu of peak, memory at full bandwidth; "
               "communication and host work not counted.")
  return lines


def _seconds(x: float) -> str:
  return f"{x:.3g} s" if x >= 1 else f"{x * 1e3:.3g} ms"
