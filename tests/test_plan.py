"""Memory plans: the tiny config planned on 8 simulated CPU devices (and a TPU topology where libtpu is
installed); the figures add up to what the programs and the resident state hold."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from ares_jax import settings as settings_lib
from ares_jax import sharding
from ares_jax import compiled_memory as cm
from ares_jax import memory_plan as mp
from ares_jax import sampling, step_time
from tiny_configs import ROOT, load_config

GIB = cm.GIB


def _config(stage: str = "ares"):
  c = load_config("tiny.py")
  c.stage = stage
  c.mesh.fsdp = -1  # all 8 simulated devices
  return c


@pytest.fixture(scope="module")
def tiny_plan():
  c = _config()
  return c, mp.plan_step(c, jax.devices(), hbm_gib=1.0)


@pytest.mark.slow
def test_plan_lists_every_program_and_the_figures_add_up(tiny_plan):
  c, plans = tiny_plan
  names = [p.name for p in plans]
  for expected in ("pass-rate rollout: paged decode loop", "SFT gradient micro-step", "SFT optimizer apply",
                   "decode weights", "rollout: prefill into free groups", "rollout: paged decode loop", "old log-probs", "reference log-probs (bfloat16)", "AEPO gradient micro-step",
                   "AEPO optimizer apply", "SFT restore", "AEPO restore"):
    assert any(n.startswith(expected) for n in names), (expected, names)
  st = mp.Setting.create(c, jax.devices(), 1.0)
  params = cm.device_bytes(st.params)
  ref = params // 2  # bfloat16 copy of fp32 parameters
  by_name = {p.name: p for p in plans}
  for p in plans:
    assert p.peak == p.resident + p.args + p.out - p.alias + p.temp
    assert (p.flops is None) == ("restore" in p.name) and (p.bytes_accessed is None) == ("restore" in p.name)
    assert p.fits(c.plan.usable) == (p.peak <= c.plan.usable * GIB)
    assert min(p.args, p.out, p.alias, p.temp, p.resident) >= 0
  micro = by_name["AEPO gradient micro-step (+ accumulation)"]
  apply = by_name["AEPO optimizer apply"]
  # AdamW's two moments of every (trainable) parameter live beside the micro-step, with the reference
  opt = micro.resident - ref
  assert 2 * params <= opt <= 2 * params + 4096
  assert apply.resident == ref
  # the micro-step reads the policy and the accumulator (one parameter-sized tree) and donates the latter
  assert micro.args >= 2 * params and micro.alias >= params
  # the apply donates the state and the accumulator: its updated state is written in place
  assert apply.alias >= params + opt
  assert by_name["reference log-probs (bfloat16)"].resident == opt + params
  # resuming: the restored state (params + moments + counters) and reference beside the loaded policy, with
  # no concrete template state; never above the training programs
  restore = by_name["AEPO restore (checkpoint onto abstract shapes)"]
  assert restore.resident == params and params + opt + ref <= restore.out <= params + opt + ref + 4096
  assert restore.args == restore.temp == restore.alias == 0
  assert restore.peak <= micro.peak
  # sharded over 8 devices: a device holds about an eighth of the parameters
  total = sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(st.params))
  assert params < total / 4
  # every program has a call count in the predicted step time (none left out as unknown)
  steps = step_time.step_seconds(c, [p.row(c.plan.usable) for p in plans], None)
  assert list(steps) == ["adacs", "aepo"] and all(q["calls"] >= 0 for s in steps.values() for q in s["programs"])


@pytest.mark.slow
def test_sft_plan_has_no_vision_gradients(tiny_plan):
  c, plans = tiny_plan
  st = mp.Setting.create(c, jax.devices(), 1.0)
  vision = cm.device_bytes(st.params["visual"])
  sft = next(p for p in plans if p.name.startswith("SFT gradient"))
  aepo = next(p for p in plans if p.name.startswith("AEPO gradient"))
  # the frozen tower has no accumulator: the SFT micro-step reads one vision tree less (it reads the
  # tower's weights once, as part of the policy)
  assert sft.alias <= aepo.alias - vision + 64


@pytest.mark.slow
@pytest.mark.parametrize("kv_cache", ["paged"])  # the dense engine's search is the same code with another base
def test_largest_chunk_fits_and_the_next_does_not(kv_cache):
  """The search finds a size that fits (prompts per call, dense; groups in flight, paged) whose double
  does not, in multiples that spread evenly over the 8 batch-sharding devices."""
  c = _config("aepo")
  c.plan.images_per_prompt = 0
  c.rollout.kv_cache = kv_cache
  st = mp.Setting.create(c, jax.devices(), 1.0)
  sc = settings_lib.sampling(c, st.mcfg, 0)
  shapes = mp.step_shapes(c, st.mcfg, sc.max_new_tokens)
  peak = lambda n, st: max(p.peak for p in mp.rollout_programs(st, sc, n, shapes, 0, costs=False))
  # a budget between the programs at 8 and at 64 prompts
  budget = (peak(8, st) + peak(64, st)) / 2 / c.plan.usable / GIB
  st = mp.Setting.create(c, jax.devices(), budget)
  chunk, plans = mp.largest_rollout_chunk(st, sc, shapes, 0, 64)
  assert 8 <= chunk < 64 and all(p.fits(c.plan.usable) for p in plans)
  assert peak(chunk * 2, st) > c.plan.usable * budget * GIB
  # slots (dense) or groups (paged) divide evenly over the batch-sharding devices (else the cache is replicated)
  assert (chunk * (sc.n + sc.max_branches) if kv_cache == "dense" else chunk) % 8 == 0


@pytest.mark.slow
def test_plan_cli_writes_json_and_fails_when_a_program_does_not_fit(tmp_path):
  out = tmp_path / "plan.json"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  cmd = [sys.executable, "-m", "ares_jax.plan", f"--config={ROOT / 'configs' / 'tiny.py'}", "--topology=cpu:8",
         "--config.stage=aepo", "--config.plan.hbm_gib=0.004", "--config.rollout.chunk_prompts=8", f"--json={out}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "DOES NOT FIT" in proc.stdout and "| rollout: paged decode loop" in proc.stdout
  # progress on stderr as it goes: each program as it compiles and when it is done, each probe of the chunk search
  assert "compiling decode_weights(" in proc.stderr and re.search(r"compiled admit in [0-9.]+ s", proc.stderr)
  assert re.search(r"chunk search: 8 groups in flight: peak \S+ GiB of \S+ GiB: does not fit", proc.stderr)
  report = json.loads(out.read_text())
  assert report["topology"] == "cpu:8" and report["hbm_gib"] == 0.004
  row = report["programs"][0]
  assert set(row) == {"name", "shapes", "args_gib", "out_gib", "temp_gib", "resident_gib", "peak_gib", "fits",
                      "flops", "bytes_accessed", "roofline_s", "collective_bytes"}
  decode = next(r for r in report["programs"] if r["name"] == "rollout: paged decode loop")
  assert 0 < decode["kv_read_ratio"] < 1 and decode["decode_step_bytes"] == decode["bytes_accessed"]
  assert any(not r["fits"] for r in report["programs"])
  # XLA's per-device cost of every compiled program (not of the restore row); no roofline on CPU devices
  assert report["chip"] is None and all(r["roofline_s"] is None for r in report["programs"])
  for r in report["programs"]:
    assert (r["flops"] is None) == r["name"].startswith("AEPO restore"), r
  assert all(r["flops"] >= 0 and r["bytes_accessed"] > 0 for r in report["programs"] if r["flops"] is not None)
  assert all(r["flops"] > 0 for r in report["programs"] if "log-probs" in r["name"] or "micro-step" in r["name"])
  # no predicted step time without chip figures: the line says so, the JSON has null and the calls
  assert re.search(r"^predicted aepo step: no prediction \(no peak figures for these devices \(chips.py\)\); "
                   r"calls per step: decode weights \(per generate call\) x1, ", proc.stdout, re.M)
  aepo = report["step_seconds"]["aepo"]
  assert aepo["roofline"] is None and aepo["at_mfu"] is None
  loop = next(q for q in aepo["programs"] if q["name"] == "rollout: paged decode loop")
  assert loop["calls"] == -(-8 // decode["groups_in_flight"]) * 112  # 8 prompts; responses at most 112 tokens
  assert report["step_assumptions"] == {"prompt_tokens": 1500, "response_tokens": 1000, "mfu": 0.4}


@pytest.mark.slow
def test_tpu_topology_plans_or_names_the_missing_wheel():
  """With libtpu installed the tiny AEPO step is planned for a v5e slice; without it, one clear error."""
  try:
    import libtpu  # noqa: F401  pylint: disable=unused-import,g-import-not-at-top
  except ImportError:
    with pytest.raises(ValueError, match="libtpu"):
      cm.topology_devices("v5e:2x2")
    return
  devices, hbm = cm.topology_devices("v5e:2x2")
  assert len(devices) == 4 and hbm == 16.0 and devices[0].platform == "tpu"
  c = _config("aepo")
  st = mp.Setting.create(c, devices, hbm)
  sc = settings_lib.sampling(c, st.mcfg, 0)
  plans = mp.rollout_programs(st, sc, 8, mp.step_shapes(c, st.mcfg, sc.max_new_tokens), 0)
  assert all(p.fits(c.plan.usable) and p.hbm == 16 * GIB for p in plans)
  assert plans[1].temp > 0 and plans[1].args >= cm.device_bytes(st.params)
  assert plans[1].flops > 0 and plans[1].bytes_accessed > 0  # XLA's TPU cost model, per device


def test_auto_chunk_on_cpu_takes_every_prompt_without_compiling():
  c = _config("aepo")
  st = mp.Setting.create(c, jax.devices(), 1.0)
  sc = sampling.SamplingConfig(max_new_tokens=8, n=2)
  assert mp.auto_chunk(c, st.mesh, st.mcfg, sc, 37) == 37


def test_plan_table_and_environment_without_compiling(monkeypatch):
  """plan.py's own parts: `cpu:N` asks XLA for N host devices before JAX starts (unless XLA_FLAGS already
  does; a TPU topology asks for nothing), and the table gives each program's GiB and verdict."""
  from ares_jax import plan  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
  plan.prepare_environment("cpu:4")
  assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=4"
  plan.prepare_environment("cpu:2")
  assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=4"
  monkeypatch.setenv("XLA_FLAGS", "")
  plan.prepare_environment("v5p:2x2x1")
  assert os.environ["XLA_FLAGS"] == ""
  hbm = 16 * GIB
  fits = cm.ProgramPlan("rollout chunk", "8 prompts", GIB, GIB // 2, GIB // 4, 2 * GIB, 3 * GIB, hbm)
  big = cm.ProgramPlan("AEPO gradient micro-step", "8 rows", 8 * GIB, GIB, 0, 4 * GIB, 4 * GIB, hbm)
  lines = plan.format_table([fits.row(0.9), big.row(0.9)], "v5e:2x2", 16.0, 0.9).splitlines()
  assert lines[0] == "memory plan for v5e:2x2: 16.0 GiB HBM per device, usable 90% (GiB per device)"
  # the memory columns, then the cost columns (tests/test_costs.py): none for hand-made rows
  assert lines[4] == "| rollout chunk | 8 prompts | 1.00 | 0.25 | 2.00 | 3.00 | 6.25 | fits | - | - | - |"
  assert lines[5] == ("| AEPO gradient micro-step | 8 rows | 8.00 | 1.00 | 4.00 | 4.00 | 17.00 | DOES NOT FIT "
                      "| - | - | - |")


def test_each_compile_says_what_it_compiles_and_how_long_it_took(caplog):
  """The planner's progress (`compile_program`): a line as a program starts compiling (its arrays' shapes, its
  numbers) and one when it is done (seconds, per-device memory)."""
  caplog.set_level(logging.INFO)
  caplog.set_level(logging.INFO, logger="absl")
  mesh = sharding.make_mesh(fsdp=8, devices=jax.devices()[:8])
  rep = NamedSharding(mesh, PartitionSpec())
  tree = {f"w{i}": jax.ShapeDtypeStruct((4, 2), jnp.float32, sharding=rep) for i in range(5)}

  @functools.partial(jax.jit, static_argnums=(2,))
  def scaled_sum(x, weights, times: int, *, bias=None):
    return x.sum() * times + sum(w.sum() for w in weights.values()) + bias

  x = jax.ShapeDtypeStruct((8, 16), jnp.bfloat16, sharding=rep)
  bias = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
  assert cm.describe_call(scaled_sum, (x, tree, 3), {"bias": bias}) == (
      "scaled_sum(x: bfloat16[8,16]; weights: float32[4,2] +4 arrays (0.2 KiB/device); times=3; bias: float32[])")
  cm.compile_program(scaled_sum, x, tree, 3, mesh=mesh, bias=bias)
  # the planner's two lines (not `compile_log`'s one line per compile, on once any run has installed it)
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(("compiling scaled_sum",
                                                                                 "compiled scaled_sum"))]
  assert lines[0] == "compiling " + cm.describe_call(scaled_sum, (x, tree, 3), {"bias": bias}), lines
  size = r"(0|[0-9.]+ [KMG]iB)"
  assert re.fullmatch(rf"compiled scaled_sum in \d+\.\d s: arguments {size}, outputs {size}, temporaries {size} "
                      r"per device", lines[1]), lines


def test_video_shapes_follow_the_plan_fields_and_reach_the_vision_tower():
  """Video-R1's training setting (16 frames of 128 x 28 x 28 pixels, which is also qwen-vl-utils' minimum: a
  square frame rounds up to 336 x 336): 8 temporal patches of 24 x 24, 1,152 video tokens a prompt; the
  synthetic batch the plans compile carries them into the tower's slot layout (no compile)."""
  from ares_jax import plan_inputs  # pylint: disable=g-import-not-at-top
  from ares_jax.sampling import chunks as chunks_lib  # pylint: disable=g-import-not-at-top
  c = _config("aepo")
  c.plan.images_per_prompt, c.plan.videos_per_prompt = 0, 1
  st = mp.Setting.create(c, jax.devices(), 1.0)
  shapes = mp.step_shapes(c, st.mcfg, 64)
  assert shapes.video_grid == (8, 24, 24) and shapes.video_tokens == 1152
  assert shapes.prompt_width >= 1152 + 2 and "raised" in shapes.note
  assert shapes.media(4) == ", 4 video 16 frames 336x336 px"
  sc = dataclasses.replace(settings_lib.sampling(c, st.mcfg, 0), chunk_prompts=2)
  chunk = chunks_lib.make_chunks(st.mcfg, plan_inputs.synthetic_batch(st.mcfg, shapes, 2), sc)[0]
  vision = chunk.inputs.vision
  assert vision.patches.shape[0] >= 2 * 8 * 24 * 24  # every frame's patches, abstract
  assert int((np.asarray(chunk.inputs.ids) == st.mcfg.video_token_id).sum()) == 2 * 1152
  # the frames of one video are its temporal patches: the time axis of its tokens steps by tokens_per_second
  t_ids = np.unique(np.asarray(chunk.inputs.positions)[0, 0][np.asarray(chunk.inputs.ids)[0] == st.mcfg.video_token_id])
  assert len(t_ids) == 8 and np.all(np.diff(t_ids) == st.mcfg.vision.tokens_per_second)
