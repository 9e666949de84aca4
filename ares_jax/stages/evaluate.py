"""Stage `eval`: a policy on benchmarks, or on the run's held-out prompts; or a rescore without a model.

  python -m ares_jax.main --config=configs/aepo_7b.py --config.stage=eval \
      --config.model.hf_path=workdirs/aepo_7b/policy \
      --config.eval.benchmarks="('mathverse=/data/MathVerse_MINI_Vision_Only.tsv', 'dynamath=/data/DynaMath.tsv')" \
      --config.eval.group_by="dynamath=qid"
  python -m ares_jax.main --config=... --config.stage=eval --config.eval.rescore=True   # re-judge, no model

The policy is `config.model.hf_path` (AdaCS and AEPO export one to `{workdir}/policy/`), else the random
initialisation. With `eval.benchmarks` (`name=path`, any layout data/reader.py reads) every item is
answered (greedy, or `eval.samples` samples for avg@k), judged (evaluation/judge.py) and written to
`{workdir}/eval/`: `<name>.jsonl`, `report.json`, `report.md`, `report.png`. Without benchmarks the
held-out prompts of `config.data` are scored as before: `{workdir}/eval.json`, accuracy and length per
difficulty, Spearman(length, difficulty).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections

from ares_jax import sampling, sharding
from ares_jax import settings as settings_lib
from ares_jax.data.grading import Grader
from ares_jax.evaluation import benchmarks, reports
from ares_jax.evaluation import judge as judge_lib
from ares_jax.evaluation.held_out import evaluate
from ares_jax.stages import setup


def judge_pool(config: ml_collections.ConfigDict) -> Grader:
  """Grading workers running the benchmark judge (each item under `aepo.grading_timeout_s`)."""
  return Grader(workers=config.grading_workers, timeout_s=config.aepo.grading_timeout_s, fn=judge_lib.judge)


def eval_dir(config: ml_collections.ConfigDict) -> str:
  return os.path.join(config.workdir, "eval")


class BenchmarkRunner:
  """`config.eval.benchmarks` read once, then run on any parameters: the eval stage runs it once, AEPO
  every `eval.every` steps. Owns a judge pool: `close()` it."""

  def __init__(self, config: ml_collections.ConfigDict, b: setup.Built, sc: sampling.SamplingConfig):
    self.config, self.b, self.settings = config, b, settings_lib.benchmark_settings(config)
    self.benches = benchmarks.load(config.eval.benchmarks, setup.columns(config), config.data.image_root or None,
                                   config.eval.max_items, config.eval.group_by)
    self.template = setup.prompt_template(config, b.tokenizer)
    self.sc = sc
    self.grader = judge_pool(config)

  def __call__(self, params, out_dir: str | None, key: jax.Array | None = None) -> dict[str, dict[str, Any]]:
    """{name: report entry}; files in `out_dir` (process 0) when given."""
    key = jax.random.key(self.config.seed + 2) if key is None else key
    return benchmarks.evaluate(self.b.mcfg, params, self.benches, self.b.processor, self.template, self.b.tokenizer,
                               self.sc, key=key, grader=self.grader, settings=self.settings,
                               max_prompt_length=self.config.rollout.max_prompt_length, out_dir=out_dir)

  def close(self) -> None:
    self.grader.close()


def metrics(report: dict[str, dict[str, Any]]) -> dict[str, float]:
  """`eval/<name>/accuracy` and `eval/<name>/tokens` for metrics.jsonl."""
  out = {}
  for name, r in report.items():
    out[f"eval/{name}/accuracy"] = r["accuracy"]
    out[f"eval/{name}/tokens"] = r["tokens"]
  return out


def decode_config(config: ml_collections.ConfigDict, sc: sampling.SamplingConfig) -> sampling.SamplingConfig:
  """`sc` as benchmarks decode: `eval.samples` samples (0: one greedy answer), no branches, no entropy
  bookkeeping. A chunk sized for `sc`'s slots per prompt keeps at most that many slots per chunk."""
  n = max(config.eval.samples, 1)
  slots = sc.n + sc.branches(True)
  chunk = sc.chunk_prompts and min(sc.chunk_prompts, max(1, sc.chunk_prompts * slots // n))
  in_flight = sc.prompts_in_flight and min(sc.prompts_in_flight, max(1, sc.prompts_in_flight * slots // n))
  return dataclasses.replace(sc, n=n, max_branches=0, track_entropy=False, chunk_prompts=chunk,
                             prompts_in_flight=in_flight,
                             temperature=sc.temperature if config.eval.samples > 0 else 0.0)


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  if config.eval.rescore:
    return rescore(config)
  b = setup.build(config)
  if not config.eval.benchmarks:
    return held_out(config, b)
  s = settings_lib.benchmark_settings(config)
  sc = decode_config(config, settings_lib.sampling(config, b.mcfg, b.pad_id))
  runner = BenchmarkRunner(config, b, setup.chunked(config, b, sc, s.batch_prompts))
  try:
    report = runner(b.params, eval_dir(config))
  finally:
    runner.close()
  print(f"policy {config.model.hf_path or 'random initialisation'}: "
        f"{f'avg@{s.samples}' if s.samples > 0 else 'greedy'}\n{reports.markdown(report)}")
  return report


def rescore(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Re-judges `{workdir}/eval/<name>.jsonl` (the names of `eval.benchmarks`, else every file there)
  with today's judge and `eval.group_by`; builds no model."""
  names = [n for n, _ in benchmarks.parse_specs(config.eval.benchmarks)]
  with judge_pool(config) as grader:
    report = benchmarks.rescore(eval_dir(config), names, grader, config.eval.group_by)
  print(reports.markdown(report))
  return report


def held_out(config: ml_collections.ConfigDict, b: setup.Built) -> dict[str, Any]:
  """Accuracy and length on `eval.prompts` held-out prompts of `config.data`; writes `{workdir}/eval.json`."""
  stream = setup.prompt_stream(config, b.processor, 1)
  sc = setup.chunked(config, b, settings_lib.sampling(config, b.mcfg, b.pad_id), config.eval.prompts)
  with setup.build_grader(config) as grader:
    out = evaluate(b.mcfg, b.params, stream, grader, b.tokenizer, sc, prompts=config.eval.prompts,
                   key=jax.random.key(config.seed), samples=config.eval.samples)
  out = {k.removeprefix("eval/"): v for k, v in out.items()}
  out.update(policy=config.model.hf_path or "random initialisation", prompts=config.eval.prompts,
             samples=config.eval.samples, skipped_rows=dict(stream.skipped))
  if sharding.is_primary():
    reports.atomic_write(os.path.join(config.workdir, "eval.json"), json.dumps(out, indent=1))
  how = f"mean@{config.eval.samples}" if config.eval.samples > 0 else "greedy"
  print(f"policy {out['policy']}: {how} accuracy {out['accuracy']:.3f}, mean length {out['length']:.1f} tokens "
        f"over {config.eval.prompts} held-out prompts")
  levels = sorted(int(k.removeprefix("accuracy_d")) for k in out if k.startswith("accuracy_d"))
  if levels:
    print(f"{'difficulty':>10s} {'accuracy':>9s} {'length':>8s}")
    for d in levels:
      print(f"{d:10d} {out[f'accuracy_d{d}']:9.3f} {out[f'length_d{d}']:8.1f}")
    print(f"Spearman(length, difficulty) = {out['spearman_length_vs_difficulty']:.3f}")
  return out
