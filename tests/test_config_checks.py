"""Config errors are found at startup, one line each naming the field, before any model is built."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ares_jax import config_checks
from tiny_configs import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_enumerations_are_the_consumers_own():
  from ares_jax import aepo
  from ares_jax.aepo.loss import LOSS_AGGS
  from ares_jax.models import layers
  from ares_jax.models.attention import IMPLEMENTATIONS
  from ares_jax.train import optimizer

  from ares_jax.data import synthetic

  assert config_checks.TARGET_MODES == aepo.TARGET_MODES and config_checks.LOSS_AGGS == LOSS_AGGS
  assert config_checks.SYNTHETIC_TASKS == synthetic.TASKS
  from ares_jax.train import row_fill
  assert config_checks.PACKINGS == row_fill.PACKINGS
  assert set(config_checks.ATTENTION) == set(IMPLEMENTATIONS)
  from ares_jax.models import lora
  assert config_checks.LORA_TARGETS == lora.TARGETS
  for name in config_checks.REMAT_POLICIES:
    layers.remat_policy(name)  # each is accepted
  with pytest.raises(ValueError):
    layers.remat_policy("sometimes")
  for kind in config_checks.SCHEDULES:
    optimizer.make_optimizer(optimizer.OptimSettings(**dict(load_config("tiny.py").optim, schedule=kind)), 10)


def _with(**fields):
  c = load_config("tiny.py")
  with c.unlocked():
    for dotted, value in fields.items():
      *parents, leaf = dotted.split("__")
      node = c
      for p in parents:
        node = node[p]
      node[leaf] = value
  return c


@pytest.mark.parametrize("fields, field", [
    (dict(aepo__target_mode="median"), "config.aepo.target_mode='median'"),
    (dict(aepo__loss_agg="sum"), "config.aepo.loss_agg='sum'"),
    (dict(aepo__dual_clip=0.5), "config.aepo.dual_clip=0.5"),
    (dict(rollout__top_p=1.5), "config.rollout.top_p=1.5"),
    (dict(rollout__n=0), "config.rollout.n=0"),
    (dict(aepo__hard_threshold=0.9), "config.aepo.hard_threshold=0.9 and easy_threshold"),
    (dict(aepo__filter_low=0.9, aepo__filter_high=0.1), "config.aepo.filter_low=0.9"),
    (dict(mesh__fsdp=-1, mesh__tensor=-1), "config.mesh=(data=1, fsdp=-1, tensor=-1)"),
    (dict(model__remat_policy="most"), "config.model.remat_policy='most'"),
    (dict(optim__schedule="linear"), "config.optim.schedule='linear'"),
    (dict(data__kind="jsonl"), "config.data.kind='jsonl'"),
    (dict(aepo__trigger_words=("wait", "")), "config.aepo.trigger_words"),
    (dict(model__hf_path="/nowhere/qwen"), "config.model.hf_path='/nowhere/qwen': no such folder"),
    (dict(data__kind="files", data__paths=("/nowhere/data",), stage="aepo"), "config.data.paths: '/nowhere/data'"),
    (dict(eval__benchmarks=("mathvista",)), "config.eval.benchmarks: 'mathvista' is not 'name=path'"),
    (dict(processor__min_pixels=10_000_000), "config.processor.min_pixels=10000000 > "),
    (dict(processor__video_fps=0.0), "config.processor.video_fps=0.0: expected > 0"),
    (dict(processor__video_min_pixels=10_000_000), "config.processor.video_min_pixels=10000000 > "),
    (dict(processor__video_max_frames=2), "config.processor.video_min_frames=4 > config.processor.video_max_frames=2"),
    (dict(processor__video_total_pixels=0), "config.processor.video_total_pixels=0: expected an integer >= 1"),
    (dict(checkpoint__keep=0), "config.checkpoint.keep=0: expected an integer >= 1"),
    (dict(aepo__max_skipped_updates=-1), "config.aepo.max_skipped_updates=-1"),
    (dict(model__lora__rank=-1), "config.model.lora.rank=-1"),
    (dict(model__lora__rank=8, model__lora__targets=("q", "qkv")), "config.model.lora.targets=('q', 'qkv')"),
    (dict(model__lora__dropout=1.0), "config.model.lora.dropout=1.0"),
    (dict(model__lora__alpha=0), "config.model.lora.alpha=0"),
    (dict(model__lora__adapter_path="/nowhere/adapter"), "config.model.lora.adapter_path='/nowhere/adapter': no such"),
])
def test_each_problem_is_one_line_naming_the_field(fields, field):
  found = config_checks.problems(_with(**fields))
  assert len(found) == 1 and found[0].startswith(field), found
  assert "\n" not in found[0]


def test_the_shipped_configs_have_no_problem_but_their_data():
  assert config_checks.problems(load_config("tiny.py")) == []
  for name, want in (("aepo_7b.py", "config.data.paths is empty"), ("adacs_7b.py", "config.adacs.pool_paths is empty")):
    assert [p.split(":")[0] for p in config_checks.problems(load_config(name))] == [want]


def test_a_lora_adapter_folder_without_safetensors_is_named(tmp_path):
  (tmp_path / "adapter_config.json").write_text("{}")
  (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
  found = config_checks.problems(_with(model__lora__adapter_path=str(tmp_path)))
  assert len(found) == 1 and "no adapter_model.safetensors in this folder" in found[0], found


def test_a_checkpoint_folder_with_pickles_only_is_named(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  (tmp_path / "pytorch_model.bin").write_bytes(b"\x80")
  [msg] = config_checks.problems(_with(model__hf_path=str(tmp_path)))
  assert "no *.safetensors weights" in msg and "PyTorch pickles, which are never loaded" in msg


def _main(*args, devices=1):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.run([sys.executable, "-m", "ares_jax.main", "--config=configs/tiny.py", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_main_prints_every_problem_in_one_line_each_without_a_traceback(tmp_path):
  out = _main("--config.aepo.target_mode=median", "--config.rollout.top_p=2.0", f"--config.workdir={tmp_path}")
  assert out.returncode == 2 and "Traceback" not in out.stderr
  fatal = [line for line in out.stderr.splitlines() if line.startswith("FATAL")]
  assert sorted(fatal) == ["FATAL: config.aepo.target_mode='median': expected one of correct_mean, batch_mean, ema, "
                           "ares_release", "FATAL: config.rollout.top_p=2.0: expected a value in (0, 1]"]
  assert not any(tmp_path.iterdir())  # nothing was built or written


@pytest.mark.slow
def test_a_mesh_larger_than_the_devices_is_one_line_with_the_way_out(tmp_path):
  out = _main("--config.stage=inspect", "--config.inspect.forward=False", "--config.mesh.fsdp=3",
              f"--config.workdir={tmp_path}")
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert "FATAL: config.mesh: data*fsdp*tensor = 3 but 1 devices are present; set one size to -1" in out.stderr
  assert "--xla_force_host_platform_device_count" in out.stderr
  verbose = _main("--config.stage=inspect", "--config.inspect.forward=False", "--config.mesh.fsdp=3",
                  f"--config.workdir={tmp_path}", "--verbose")
  assert verbose.returncode != 0 and "Traceback" in verbose.stderr and "MeshError" in verbose.stderr


def test_update_fields_are_checked_at_startup():
  c = load_config("tiny.py")
  c.updates.packing = "dense"
  c.updates.row_tokens = 64
  found = "\n".join(config_checks.problems(c))
  assert "config.updates.packing='dense': expected one of shared_prompt, packed, none" in found
  assert "config.updates.row_tokens=64 cannot hold the aepo stage's longest sequence" in found
