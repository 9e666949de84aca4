"""Benchmark scripts at a tiny size: they call the engines' internals (the paged engine's admit and decode
calls, the dense prefill), so an interface change breaks here rather than on the GPU host that runs them."""

import importlib.util
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _script(name: str):
  spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_rollout_engine_tiny(tmp_path, capsys):
  out = _script("rollout_engine").main(["--preset=tiny", "--decode_attention=per_slot,per_group",
                                        f"--json={tmp_path / 'r.json'}"])  # asserts same tokens
  table = capsys.readouterr().out
  assert "| dense |" in table and "| paged |" in table and "same tokens" in table
  assert "/ per_slot |" in table and "/ per_group |" in table
  dense, *paged_runs = out["results"]
  for paged in paged_runs:
    assert paged["forks"] > 0, "the tiny preset should fork, so the fork paths of both engines run"
    # all prompts in flight: the paged engine loops exactly as long as the dense one, whose count is rebuilt
    # from the fork tree; the engine's own counter checks that rebuild
    assert dense["iterations"] == paged["iterations"] > 0
    assert dense["tokens"] == paged["tokens"] > 0 and paged["max_logprob_diff"] < 1e-4
  assert json.loads((tmp_path / "r.json").read_text())["results"][1]["engine"] == "paged"


def test_update_packing_tiny(capsys):
  out = _script("update_packing").main(["--preset=tiny", "--repeats=1"])  # asserts the same log-probs and loss
  table = capsys.readouterr().out
  assert all(f"| {layout} |" in table for layout in ("none", "none_mixed", "packed", "shared_prompt"))
  none, mixed, packed, shared = out["results"]
  assert mixed["computed"] >= none["computed"] > packed["computed"] > shared["computed"]
  assert out["max_logprob_diff"] < 1e-4
  assert shared["needed"] < packed["needed"] == none["needed"] == mixed["needed"]
