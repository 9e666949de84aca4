"""The predicted step time (`step_time`): calls per step from the config, each program's time per call on a
chip, their sums per stage, the JSON keys and the printed line; by hand on made-up rows and chip figures."""

from __future__ import annotations

import math

import ml_collections
import pytest

from ares_jax import chips, configs, config_checks, plan, step_time
from tiny_configs import load_config

# 1e12 FLOP/s and 1e11 B/s per device: a call's roofline is easy to read off
FAKE = chips.Device(chips.Chip("fake", 1e12, 1e11, 16.0, 1, "test"))


def _config(**update) -> ml_collections.ConfigDict:
  c = configs.base_config(stage="ares", workdir="/tmp/x")
  c.rollout.prompts_per_step, c.rollout.n = 10, 4  # 40 trajectories
  c.aepo.global_batch_size, c.aepo.micro_batch_size = 16, 4  # mini-batches of 16, 16, 8
  c.ppo_epochs = 2
  c.adacs.batch_size, c.adacs.micro_batch_size = 10, 4
  c.plan.prompt_tokens, c.plan.response_tokens, c.plan.mfu = 100, 50, 0.5
  if update:
    c.updates = ml_collections.ConfigDict(update)
  return c


def _row(name: str, flops, moved, **extra) -> dict:
  return {"name": name, "flops": flops, "bytes_accessed": moved, **extra}


ROWS = [_row("pass-rate rollout: paged decode loop", 1e9, 1e9, groups_in_flight=8),
        _row("SFT restore (checkpoint onto abstract shapes)", None, None),
        _row("SFT gradient micro-step (+ accumulation)", 4e12, 1e10),  # compute-bound: 4 s, 8 s at 50%
        _row("SFT optimizer apply", 0.0, 2e10),  # memory-bound: 0.2 s
        _row("decode weights (per generate call)", 0.0, 1e10),  # 0.1 s
        _row("rollout: prefill into free groups", 2e12, 1e10, prompts_per_call=3),  # 2 s, 4 s
        _row("rollout: paged decode loop", 1e9, 1e9, groups_in_flight=4),  # 0.01 s either way
        _row("old log-probs (policy)", 1e12, 1e10),  # 1 s, 2 s
        _row("reference log-probs (bfloat16)", 1e12, 1e10),
        _row("AEPO restore (checkpoint onto abstract shapes)", None, None),
        _row("AEPO gradient micro-step (+ accumulation)", 3e12, 1e10),  # 3 s, 6 s
        _row("AEPO optimizer apply", 0.0, 3e10)]  # 0.3 s


def test_update_calls_without_packing_count_rows():
  u = step_time.update_calls(_config(packing="none"))
  # 40 trajectories in micro-batches of 4: 10 scoring calls; mini-batches 16, 16, 8 -> 4 + 4 + 2 micro-steps
  # per epoch, two epochs; an apply per mini-batch; SFT: ceil(10 / 4) micro-steps and one apply
  assert u == {"packing": "none",
               "aepo": {"trajectories": 40, "mini_batches": 3, "scoring": 10, "micro_step": 20, "apply": 6},
               "sft": {"micro_step": 3, "apply": 1}}


def test_update_calls_by_tokens_when_packed_or_sharing_prompts():
  packed = step_time.update_calls(_config(packing="packed", row_tokens=300, tokens_per_micro_batch=1000))
  # 150 tokens a trajectory, two a row, 3 rows a micro-batch: scoring 20 rows -> 7; mini-batches of 16, 16 and 8
  # trajectories: 8, 8 and 4 rows -> 3 + 3 + 2 micro-batches, twice
  assert packed["aepo"] == {"trajectories": 40, "mini_batches": 3, "scoring": 7, "micro_step": 16, "apply": 6}
  assert packed["sft"] == {"micro_step": 2, "apply": 1}  # 10 examples: 5 rows
  shared = step_time.update_calls(_config(packing="shared_prompt", row_tokens=300, tokens_per_micro_batch=1000))
  # a group (each prompt once, then its 4 responses: 100 + 4 x 50) fills a row: scoring 10 rows -> 4;
  # mini-batches of 4, 4 and 2 groups -> 2 + 2 + 1 micro-batches, twice
  assert shared["aepo"] == {"trajectories": 40, "mini_batches": 3, "scoring": 4, "micro_step": 10, "apply": 6}
  assert shared["sft"] == packed["sft"]  # one response per SFT prompt: nothing to share
  with pytest.raises(ValueError, match="config.updates.packing='rows'"):
    step_time.update_calls(_config(packing="rows", tokens_per_micro_batch=1000))


def test_step_seconds_by_hand():
  c = _config(packing="none")
  steps = step_time.step_seconds(c, ROWS, FAKE)
  assert set(steps) == {"adacs", "aepo"}
  calls = {q["name"]: q["calls"] for s in steps.values() for q in s["programs"]}
  assert calls == {"pass-rate rollout: paged decode loop": 0, "SFT restore (checkpoint onto abstract shapes)": 0,
                   "SFT gradient micro-step (+ accumulation)": 3, "SFT optimizer apply": 1,
                   "decode weights (per generate call)": 1,
                   "rollout: prefill into free groups": 4,  # ceil(10 prompts / 3)
                   "rollout: paged decode loop": 3 * 50,  # ceil(10 / 4 groups) waves x 50 response tokens
                   "old log-probs (policy)": 10, "reference log-probs (bfloat16)": 10,
                   "AEPO restore (checkpoint onto abstract shapes)": 0,
                   "AEPO gradient micro-step (+ accumulation)": 20, "AEPO optimizer apply": 6}
  assert steps["adacs"]["roofline"] == pytest.approx(3 * 4 + 0.2)
  assert steps["adacs"]["at_mfu"] == pytest.approx(3 * 8 + 0.2)
  assert steps["aepo"]["roofline"] == pytest.approx(0.1 + 4 * 2 + 150 * 0.01 + 20 * 1 + 20 * 3 + 6 * 0.3)
  assert steps["aepo"]["at_mfu"] == pytest.approx(0.1 + 4 * 4 + 150 * 0.01 + 20 * 2 + 20 * 6 + 6 * 0.3)
  micro = next(q for q in steps["aepo"]["programs"] if q["name"].startswith("AEPO gradient"))
  assert micro == {"name": "AEPO gradient micro-step (+ accumulation)", "calls": 20,
                   "how": "2 epoch(s) x 3 mini-batches of <= 16 trajectories, in micro-batches of 4 rows",
                   "roofline_s": 3.0, "at_mfu_s": 6.0}
  how = {q["name"]: q["how"] for s in steps.values() for q in s["programs"]}
  assert how["old log-probs (policy)"] == "40 trajectories in micro-batches of 4 rows"
  assert how["SFT gradient micro-step (+ accumulation)"] == "10 examples in micro-batches of 4 rows"
  assert how["rollout: paged decode loop"] == "ceil(10 prompts / 4 groups in flight) x 50 response tokens"
  packed = step_time.step_seconds(_config(packing="packed", row_tokens=300, tokens_per_micro_batch=1000), ROWS, FAKE)
  old = next(q for q in packed["aepo"]["programs"] if q["name"].startswith("old log-probs"))
  assert old["how"] == "40 trajectories in micro-batches of 3 rows of 300 tokens (packed; 100 + 50 a trajectory)"


def test_dense_engine_counts_a_decode_step_per_response_token_and_unknown_programs_apart():
  c = _config()
  c.rollout.max_response_length = 20  # the expected 50 response tokens cannot be: 20
  rows = [_row("rollout chunk (prefill + decode loop)", 1e9, 1e9, prompts_per_call=4), _row("new thing", 1.0, 1.0)]
  steps = step_time.step_seconds(c, rows, FAKE)
  chunk = steps["aepo"]["programs"][0]
  assert chunk["calls"] == math.ceil(10 / 4) * 20 and "prefill included" in chunk["how"]
  assert steps["aepo"]["roofline"] == pytest.approx(60 * 0.01)
  assert steps["other"]["programs"][0]["calls"] == 0
  lines = step_time.format_lines(c, steps, FAKE)
  assert lines[0] == ("predicted aepo step: 600 ms at the roofline, 600 ms at 50% MFU; calls per step: "
                      "rollout chunk (prefill + decode loop) x60")
  assert lines[1] == "not counted (no call count known): new thing"
  assert lines[2].startswith("Step time: sum of calls x time per call at 100 prompt + 20 response tokens")


def test_no_prediction_without_chip_figures():
  c = _config(packing="none")
  steps = step_time.step_seconds(c, ROWS, None)
  assert all(s["roofline"] is None and s["at_mfu"] is None for s in steps.values())
  line = step_time.format_lines(c, steps, None)[0]
  assert line.startswith("predicted adacs step: no prediction (no peak figures for these devices (chips.py)); "
                         "calls per step: SFT gradient micro-step (+ accumulation) x3, SFT optimizer apply x1")


def test_printed_lines_and_json_keys():
  c = _config(packing="none")
  steps = step_time.step_seconds(c, ROWS, FAKE)
  lines = step_time.format_lines(c, steps, FAKE)
  assert lines[0] == ("predicted adacs step: 12.2 s at the roofline, 24.2 s at 50% MFU; calls per step: "
                      "SFT gradient micro-step (+ accumulation) x3, SFT optimizer apply x1")
  assert lines[1].startswith("predicted aepo step: 91.4 s at the roofline, 179 s at 50% MFU; calls per step: "
                             "decode weights (per generate call) x1, rollout: prefill into free groups x4, "
                             "rollout: paged decode loop x150, old log-probs (policy) x10, ")
  assert lines[2].startswith("Step time: sum of calls x time per call at 100 prompt + 50 response tokens")
  report = plan.report([], "v5e:2x2", 16.0, 0.95, FAKE, steps, c.plan)
  assert report["step_assumptions"] == {"prompt_tokens": 100, "response_tokens": 50, "mfu": 0.5}
  assert set(report["step_seconds"]) == {"adacs", "aepo"}
  assert set(report["step_seconds"]["aepo"]) == {"roofline", "at_mfu", "programs"}
  assert set(report["step_seconds"]["aepo"]["programs"][0]) == {"name", "calls", "how", "roofline_s", "at_mfu_s"}
  assert "step_seconds" not in plan.report([], "cpu:8", 1.0, 0.95)


def test_plan_fields_are_checked():
  c = load_config("tiny.py")
  assert config_checks.problems(c) == []
  assert (c.plan.prompt_tokens, c.plan.response_tokens, c.plan.mfu) == (1500, 1000, 0.4)  # the defaults
  c.plan.prompt_tokens, c.plan.response_tokens, c.plan.mfu = 0, -3, 1.5
  found = config_checks.problems(c)
  assert "config.plan.prompt_tokens=0: expected an integer >= 1" in found
  assert "config.plan.response_tokens=-3: expected an integer >= 1" in found
  assert "config.plan.mfu=1.5: expected a utilisation in (0, 1]" in found
