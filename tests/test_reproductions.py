"""The reproduction drivers' tables and checks (ares_jax/reproductions/), on made-up evaluations."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ares_jax.reproductions import ablation, law, runs, tables


def _eval(acc, length, rho):
  out = {"eval/accuracy": float(np.mean(acc)), "eval/length": float(np.mean(length)),
         "eval/spearman_length_vs_difficulty": rho}
  for d, (a, n) in enumerate(zip(acc, length), start=1):
    out[f"eval/accuracy_d{d}"], out[f"eval/length_d{d}"] = a, n
  return out


def test_summary_is_mean_and_sample_std_over_seeds_and_renders(tmp_path):
  per_row = {"after AdaCS": {0: _eval([0.8, 0.5, 0.2], [60, 70, 80], 0.3),
                             1: _eval([0.6, 0.5, 0.4], [62, 72, 90], 0.5)},
             "after AEPO": {0: _eval([0.9, 0.7, 0.5], [58, 80, 95], 0.6),
                            1: _eval([0.7, 0.7, 0.3], [58, 84, 97], 0.7)}}
  s = tables.summarize(per_row)
  assert s["difficulties"] == [1, 2, 3]
  r = s["rows"]["after AdaCS"]
  assert r["accuracy"]["1"] == pytest.approx((0.7, np.std([0.8, 0.6], ddof=1)))
  assert r["length"]["3"] == pytest.approx((85.0, np.std([80, 90], ddof=1)))
  assert r["spearman"] == pytest.approx((0.4, np.std([0.3, 0.5], ddof=1))) and r["seeds"] == 2
  md = tables.markdown(s, "t")
  assert "| after AEPO (n=2) | 0.800 ± 0.141 |" in md and md.count("\n| ") == 3
  paths = tables.write(s, str(tmp_path), "law", "t", {"extra": 1})
  assert json.loads(open(paths[0]).read())["extra"] == 1
  assert open(paths[2], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  one = tables.summarize({"x": {0: _eval([0.5, 0.5], [10, 20], 1.0)}})
  assert one["rows"]["x"]["accuracy"]["2"] == (0.5, 0.0)  # one seed: std 0


def test_law_checks_read_the_easiest_and_hardest_difficulty():
  base = _eval([0.7, 0.5, 0.3], [70, 70, 70], 0.0)
  sft = _eval([0.8, 0.5, 0.2], [60, 70, 80], 0.3)
  rl = _eval([0.9, 0.7, 0.5], [58, 80, 95], 0.6)
  ok = law.law_checks({"before AdaCS": base, "after AdaCS": sft, "after AEPO": rl}, [1, 2, 3])
  assert all(ok.values()) and len(ok) == 4
  longer_easy = dict(rl, **{"eval/length_d1": 61.0})
  worse_hard = dict(rl, **{"eval/accuracy_d3": 0.2})
  assert not law.law_checks({"before AdaCS": base, "after AdaCS": sft, "after AEPO": longer_easy},
                            [1, 2, 3])["aepo_does_not_lengthen_easiest"]
  # at the quick answer's floor, a tenth of a token is one careful sample, not a lengthening (up to 1%)
  at_floor = dict(rl, **{"eval/length_d1": 60.55})
  assert law.law_checks({"before AdaCS": base, "after AdaCS": sft, "after AEPO": at_floor},
                        [1, 2, 3])["aepo_does_not_lengthen_easiest"]
  assert not law.law_checks({"before AdaCS": base, "after AdaCS": sft, "after AEPO": worse_hard},
                            [1, 2, 3])["aepo_raises_hardest_accuracy"]
  assert not law.law_checks({"before AdaCS": sft, "after AdaCS": base, "after AEPO": rl},
                            [1, 2, 3])["adacs_raises_spearman"]


def test_ablation_variants_switch_on_one_part_at_a_time():
  runs_ = ablation.variant_runs(("--config=configs/tiny.py",), "/p", [0, 1], "/w", [])
  assert len(runs_) == 8 and [r for r, s, _ in runs_[::2]] == [v[1] for v in ablation.VARIANTS]
  args = {row: set(run.args) for row, s, run in runs_ if s == 0}
  grpo, kl, ent, full = (args[v[1]] for v in ablation.VARIANTS)
  assert {"--config.aepo.target_mode=batch_mean", "--config.aepo.rho=1.0", "--config.rollout.max_branches=0",
          "--config.aepo.kl_bin_scale=(1.0,1.0,1.0)"} <= grpo
  assert kl == grpo - {"--config.aepo.rho=1.0", "--config.aepo.kl_bin_scale=(1.0,1.0,1.0)"}
  assert ent == kl - {"--config.aepo.target_mode=batch_mean"}
  assert full == ent - {"--config.rollout.max_branches=0"}
  assert "--config.model.hf_path=/p" in full and runs_[1][2].workdir == "/w/grpo/seed_1"
  assert [r for r, _, _ in ablation.variant_runs((), "/p", [0], "/w", ["aepo"])] == ["+ branching (AEPO)"]


@pytest.mark.parametrize("config", ["tiny.py", "aepo_3b.py", "aepo_7b.py", "aepo_7b_lora.py"])
def test_the_overrides_parse_on_a_config(config):
  """Every variant's overrides are fields the config has, with values of their types, that the startup checks
  accept: the ablation switches work on the 3B/7B configs as on the tiny one."""
  import subprocess
  import sys

  code = ("import sys; from absl import flags; from ares_jax import config_checks, main; "
          "flags.FLAGS(sys.argv); c = flags.FLAGS.config; "
          "print([p for p in config_checks.problems(c) if any(f in p for f in "
          "('target_mode', 'kl_bin_scale', 'rho', 'max_branches'))]); "
          "print(c.aepo.target_mode, tuple(c.aepo.kl_bin_scale), c.aepo.rho, c.rollout.max_branches)")
  out = subprocess.run([sys.executable, "-c", code, f"--config=configs/{config}", *ablation.GRPO],
                       capture_output=True, text=True, cwd=str(tables.__file__).rsplit("/ares_jax/", 1)[0])
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["[]", "batch_mean", "(1.0,", "1.0,", "1.0)", "1.0", "0"]


def test_config_args_pass_overrides_on_and_refuse_the_drivers_own():
  argv = ["law", "--config=configs/tiny.py", "--config.total_steps=2", "--seeds=0", "--workdir=/w"]
  assert runs.config_args(argv) == ("--config=configs/tiny.py", "--config.total_steps=2")
  from absl import app

  with pytest.raises(app.UsageError, match="--seeds"):
    runs.config_args(["law", "--config=configs/tiny.py", "--config.seed=3"])
  with pytest.raises(app.UsageError, match="workdir"):
    runs.config_args(["law", "--config=configs/tiny.py", "--config.workdir=/x"])


def test_launch_reads_finished_runs_back_and_reports_a_failed_one(tmp_path, bucket):
  done = [runs.Run("local", str(tmp_path / "a"), ()), runs.Run("remote", f"{bucket}/w/a", ())]
  for r in done:
    runs.storage.write_json(f"{r.workdir}/DONE", {"seconds": 5.0})
  assert runs.launch(done) == {"local": 0.0, "remote": 0.0}  # nothing started
  bad = runs.Run("bad", f"{bucket}/w/b", ("--config=configs/tiny.py", "--config.no_such_field=1"))
  with pytest.raises(RuntimeError, match="no_such_field"):
    runs.launch([bad])
  assert "no_such_field" in runs.storage.read_text(f"{bucket}/w/b.log")  # copied beside the workdir
  assert not runs.storage.exists(f"{bucket}/w/b/DONE")
