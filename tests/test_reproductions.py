"""The reproduction drivers' tables and checks (ares_jax/reproductions/), on made-up evaluations."""

from __future__ import annotations

import json

import numpy as np
import pytest
from absl import app

from ares_jax.reproductions import law, runs, tables, variants


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
  runs_ = variants.variant_runs(("--config=configs/tiny.py",), {0: "/p", 1: "/p"}, "/w", [])
  assert len(runs_) == 8 and [r for r, s, _ in runs_[::2]] == [v[1] for v in variants.VARIANTS]
  args = {row: set(run.args) for row, s, run in runs_ if s == 0}
  grpo, kl, ent, full = (args[v[1]] for v in variants.VARIANTS)
  assert {"--config.aepo.target_mode=batch_mean", "--config.aepo.rho=1.0", "--config.rollout.max_branches=0",
          "--config.aepo.kl_bin_scale=(1.0,1.0,1.0)"} <= grpo
  assert kl == grpo - {"--config.aepo.rho=1.0", "--config.aepo.kl_bin_scale=(1.0,1.0,1.0)"}
  assert ent == kl - {"--config.aepo.target_mode=batch_mean"}
  assert full == ent - {"--config.rollout.max_branches=0"}
  assert "--config.model.hf_path=/p" in full and runs_[1][2].workdir == "/w/grpo/seed_1"
  assert [r for r, _, _ in variants.variant_runs((), {0: "/p"}, "/w", ["aepo"])] == ["+ branching (AEPO)"]
  per_seed = variants.variant_runs((), {0: "/a0", 2: "/a2"}, "/w", ["grpo"])  # each seed from its own policy
  assert [("--config.model.hf_path=/a0" in r.args, "--config.seed=2" in r.args) for _, _, r in per_seed] == [
      (True, False), (False, True)]
  with pytest.raises(app.UsageError, match="unknown.*'nope'"):
    variants.check_slugs(["grpo", "nope"])


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
  out = subprocess.run([sys.executable, "-c", code, f"--config=configs/{config}", *variants.GRPO],
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


def _run_rows(accs, tokens_d1, entropy, every=2, resumed_at=None):
  """metrics.jsonl of a run: evaluations at 0, every, ... (3 levels), a training row per step; `resumed_at`
  repeats the steps after it with other values first, as a run that resumed from a checkpoint logs them."""
  rows = []
  for i, (a, t) in enumerate(zip(accs, tokens_d1)):
    rows.append({"step": i * every, **_eval([a, a, a], [t, 2 * t, 3 * t], 0.5)})
  rows += [{"step": t, "loss": 0.1, "entropy/mean": e} for t, e in enumerate(entropy, start=1)]
  if resumed_at is not None:  # stale rows of the steps after the checkpoint, logged before the ones above
    stale = [dict(r, **{k: -1.0 for k in ("eval/accuracy", "entropy/mean") if k in r})
             for r in rows if r["step"] > resumed_at]
    rows = stale + rows
  return rows


def test_long_run_curves_steps_to_threshold_and_easy_drift():
  from ares_jax.reproductions import curves
  # evaluations at steps 0, 2, 4, 6, 8; training steps 1..8
  a = curves.seed_curves(_run_rows([0.5, 0.8, 0.92, 0.95, 0.95], [60, 58, 57, 59, 61], [1, 2, 3, 4, 5, 6, 7, 8],
                                   resumed_at=4), every=2)
  assert a["steps"] == [0, 2, 4, 6, 8] and a["accuracy"]["all"] == pytest.approx([0.5, 0.8, 0.92, 0.95, 0.95])
  assert a["tokens"]["2"] == [120, 116, 114, 118, 122] and a["tokens"]["all"] == pytest.approx([120, 116, 114, 118, 122])
  # step s averages the rollouts of the policies after s-1 and s updates (steps s and s+1); step 0 the first's
  assert a["entropy"] == [1.0, 2.5, 4.5, 6.5, 8.0]
  assert curves.first_at_least(a["steps"], a["accuracy"]["all"], 0.9) == 4
  # converged at step 4 (57 tokens); the last 4 steps' evaluations are 6 and 8: (59 + 61) / 2 - 57 = 3
  assert curves.late_drift(a, "1", 0.9, late_steps=4) == pytest.approx(3.0)
  never = curves.seed_curves(_run_rows([0.5, 0.6, 0.6, 0.7, 0.7], [60] * 5, [1.0] * 8), every=2)
  assert curves.late_drift(never, "1", 0.9, 4) is None
  b = curves.seed_curves(_run_rows([0.6, 0.9, 0.9, 0.9, 0.9], [70, 60, 60, 60, 60], [2.0] * 8), every=2)

  s = curves.summarize({"GRPO": {0: a, 1: never}, "AEPO": {0: b, 1: b}}, threshold=0.9, late_steps=4)
  assert s["steps"] == [0, 2, 4, 6, 8] and s["difficulties"] == [1, 2, 3] and s["easiest"] == "1"
  g, e = s["variants"]["GRPO"], s["variants"]["AEPO"]
  assert g["accuracy"]["all"][2] == pytest.approx([0.76, float(np.std([0.92, 0.6], ddof=1))])
  assert g["steps_to_threshold"]["per_seed"] == {0: 4, 1: None}
  assert g["steps_to_threshold"]["mean_std_n"] == [4.0, 0.0, 1]  # over the seeds that reached it
  assert g["easy_drift"]["mean_std_n"] == pytest.approx([3.0, 0.0, 1])
  assert e["steps_to_threshold"]["mean_std_n"] == [2.0, 0.0, 2] and e["easy_drift"]["mean_std_n"] == [0.0, 0.0, 2]
  assert e["entropy"][0] == [2.0, 0.0]
  md = curves.markdown(s, "t")
  assert "| GRPO (n=2) | 4 ± 0 (n = 1/2) | 3.0 ± 0.0 (n = 1/2) |" in md
  assert "| AEPO (n=2) | 2 ± 0 | 0.0 ± 0.0 |" in md
  assert "| 8 | 0.825 ± 0.177 | 0.900 ± 0.000 |" in md


def test_long_run_plot_and_usage_errors(tmp_path):
  from ares_jax.reproductions import curves, long_run
  c = curves.seed_curves(_run_rows([0.5, 0.95], [60, 58], [1.0, 2.0]), every=2)
  s = curves.summarize({"GRPO": {0: c}, "AEPO": {0: c}}, threshold=0.9, late_steps=2)
  path = curves.plot(s, str(tmp_path / "c.png"), "t")
  assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.endswith("c.png")
  with pytest.raises(app.UsageError, match="--steps and --eval_every"):
    long_run.check_flags(("--config=configs/tiny.py", "--config.total_steps=5"))


# The long run's driver end to end, at CI size: one seed, two variants, 4 steps with an evaluation every 2.
LONG_RUN_SMALL = ["--config=configs/tiny.py", "--config.mesh.fsdp=1", "--config.warm_start.steps=0",
                  "--config.data.min_steps=1", "--config.data.max_steps=3", "--config.adacs.synthetic_questions=12",
                  "--config.adacs.max_checks=2", "--config.adacs.pass_rate_samples=2",
                  "--config.adacs.pass_rate_batch=4", "--config.adacs.budget=8", "--config.adacs.batch_size=4",
                  "--config.adacs.micro_batch_size=4", "--config.adacs.epochs=1", "--config.adacs.eval_prompts=6",
                  "--config.adacs.max_response_length=32", "--config.rollout.max_response_length=32",
                  "--config.eval.prompts=6", "--config.eval.samples=2", "--config.rollout.n=4",
                  "--config.rollout.max_branches=2", "--config.rollout.prompts_per_step=4",
                  "--config.aepo.global_batch_size=8", "--config.aepo.micro_batch_size=8",
                  "--config.aepo.filter_low=0.0", "--config.grading_workers=1", "--config.log_compiles=False"]


@pytest.mark.slow
def test_long_run_driver_runs_resumes_and_writes_its_tables(tmp_path):
  import subprocess
  import sys
  from pathlib import Path

  root = Path(tables.__file__).resolve().parents[2]
  wd = tmp_path / "long"
  cmd = [sys.executable, "-m", "ares_jax.reproductions.long_run", *LONG_RUN_SMALL, "--seeds=0",
         "--variants=grpo,aepo", "--steps=4", "--eval_every=2", "--threshold=0.0", "--late_steps=2",
         f"--workdir={wd}", "--parallel=2"]
  out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=1500)
  assert out.returncode == 0, out.stderr[-4000:]
  s = json.loads((wd / "long_run.json").read_text())
  assert list(s["variants"]) == ["GRPO", "+ branching (AEPO)"] and s["steps"] == [0, 2, 4]
  for v in s["variants"].values():
    assert v["seeds"] == [0] and len(v["accuracy"]["all"]) == 3 and len(v["entropy"]) == 3
    assert v["steps_to_threshold"]["per_seed"] == {"0": 0}  # threshold 0: converged at the first evaluation
    assert v["easy_drift"]["mean_std_n"][2] == 1
  assert s["policies"] == {"0": str(wd / "adacs" / "seed_0" / "policy")}
  assert (wd / "long_run.png").stat().st_size > 10_000 and "| GRPO (n=1) | 0 ± 0 |" in (wd / "long_run.md").read_text()
  # Read back, not rerun: every run is DONE, so a second call only rebuilds the tables
  again = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-4000:]
  assert json.loads((wd / "long_run.json").read_text())["seconds_per_run"] == {
      "adacs seed 0": 0.0, "grpo seed 0": 0.0, "aepo seed 0": 0.0}
