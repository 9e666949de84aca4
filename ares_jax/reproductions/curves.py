"""Held-out curves over training steps, per variant, mean +- std over seeds: the long run's summary, its
markdown and its plot.

Input per variant and seed: a run's `metrics.jsonl` rows (`storage.read_jsonl`). Its evaluations (`eval/*`,
every `eval.every` steps from step 0) give accuracy and tokens, all and per difficulty; its training steps give
the rollout's mean token entropy (`entropy/mean`), averaged over the rollouts of the policies since the
previous evaluation (the rollout of step t samples the policy after t - 1 updates). A run that resumed logs
the steps after its checkpoint twice: the last row of a step wins. The std is over seeds (ddof = 1; 0 for one
seed); a statistic that some seeds lack (e.g. a run that never reached the threshold) is over those that
have it, with their count.
"""

from __future__ import annotations

import numpy as np

from ares_jax import storage
from ares_jax.reproductions import tables


def by_step(rows: list[dict], key: str) -> dict[int, dict]:
  """The last row per step among the rows that hold `key`."""
  return {int(r["step"]): r for r in rows if key in r}


def seed_curves(rows: list[dict], every: int) -> dict:
  """One run's curves: {"steps", "accuracy": {"all", "<d>": [...]}, "tokens": {...}, "entropy": [...]}."""
  evals = by_step(rows, "eval/accuracy")
  steps = sorted(evals)
  ds = tables.difficulties([evals[s] for s in steps])
  out = {"steps": steps, "accuracy": {"all": [evals[s]["eval/accuracy"] for s in steps]},
         "tokens": {"all": [evals[s]["eval/length"] for s in steps]}}
  for d in ds:
    out["accuracy"][str(d)] = [evals[s][f"eval/accuracy_d{d}"] for s in steps]
    out["tokens"][str(d)] = [evals[s][f"eval/length_d{d}"] for s in steps]
  train = by_step(rows, "entropy/mean")
  entropy = []
  for s in steps:  # the rollouts of the policies after s - every + 1 .. s updates: steps s - every + 2 .. s + 1
    window = [train[t]["entropy/mean"] for t in range(max(1, s - every + 2), s + 2) if t in train]
    entropy.append(float(np.mean(window)) if window else float("nan"))
  out["entropy"] = entropy
  return out


def first_at_least(steps: list[int], values: list[float], threshold: float) -> int | None:
  """The first step whose value reaches `threshold`, or None."""
  return next((s for s, v in zip(steps, values) if v >= threshold), None)


def late_drift(curves: dict, level: str, threshold: float, late_steps: int) -> float | None:
  """Tokens at difficulty `level`: the mean over the evaluations of the last `late_steps` steps minus the value
  at convergence (the first evaluation whose accuracy over all levels reaches `threshold`); None when the run
  never converged."""
  steps, tokens = curves["steps"], curves["tokens"][level]
  at = first_at_least(steps, curves["accuracy"]["all"], threshold)
  if at is None:
    return None
  late = [v for s, v in zip(steps, tokens) if s > steps[-1] - late_steps]
  return float(np.mean(late) - tokens[steps.index(at)])


def _mean_std_n(values: list[float | None]) -> list[float]:
  """[mean, std, n] over the values that are not None (NaN, NaN, 0 when none are)."""
  v = [x for x in values if x is not None]
  if not v:
    return [float("nan"), float("nan"), 0]
  m, s = tables.mean_std(v)
  return [m, s, len(v)]


def summarize(per_seed: dict[str, dict[int, dict]], threshold: float, late_steps: int) -> dict:
  """{variant: {seed: seed_curves}} -> {"steps", "difficulties", "threshold", "late_steps", "variants": {variant:
  {"seeds", "accuracy": {level: [[mean, std], ...]}, "tokens": {...}, "entropy": [[mean, std], ...],
  "steps_to_threshold": {"per_seed", "mean_std_n"}, "easy_drift": {"per_seed", "mean_std_n"}}}}. Curves are on
  the evaluation steps every run has; the easiest difficulty is the drift's level."""
  all_curves = [c for seeds in per_seed.values() for c in seeds.values()]
  steps = sorted(set.intersection(*[set(c["steps"]) for c in all_curves]))
  levels = ["all"] + [k for k in all_curves[0]["accuracy"] if k != "all"]
  easiest = levels[1] if len(levels) > 1 else "all"
  out = {"steps": steps, "difficulties": [int(k) for k in levels[1:]], "threshold": threshold,
         "late_steps": late_steps, "easiest": easiest, "variants": {}}
  for name, seeds in per_seed.items():
    at = {s: [c["steps"].index(t) for t in steps] for s, c in seeds.items()}
    series = lambda s, c, key, level=None: [(c[key][level] if level else c[key])[i] for i in at[s]]
    v = {"seeds": sorted(seeds)}
    for key in ("accuracy", "tokens"):
      v[key] = {lv: [list(tables.mean_std(col)) for col in zip(*[series(s, c, key, lv) for s, c in seeds.items()])]
                for lv in levels}
    v["entropy"] = [list(tables.mean_std(col)) for col in zip(*[series(s, c, "entropy") for s, c in seeds.items()])]
    reach = {s: first_at_least(c["steps"], c["accuracy"]["all"], threshold) for s, c in seeds.items()}
    drift = {s: late_drift(c, easiest, threshold, late_steps) for s, c in seeds.items()}
    v["steps_to_threshold"] = {"per_seed": reach, "mean_std_n": _mean_std_n(list(reach.values()))}
    v["easy_drift"] = {"per_seed": drift, "mean_std_n": _mean_std_n(list(drift.values()))}
    out["variants"][name] = v
  return out


def _ms(ms: list[float], p: int) -> str:
  return f"{ms[0]:.{p}f} ± {ms[1]:.{p}f}"


def markdown(summary: dict, title: str) -> str:
  """Per variant: the steps to the threshold, the easy-answer drift, and the last evaluation (accuracy and
  tokens per level, entropy); then held-out accuracy (all levels) at every evaluation."""
  ds, steps = summary["difficulties"], summary["steps"]
  th, late, easiest = summary["threshold"], summary["late_steps"], summary["easiest"]
  head = ["variant", f"steps to acc ≥ {th}", f"tokens d={easiest}: last {late} steps − at convergence",
          *[f"acc d={d}" for d in ds], "acc all", *[f"tokens d={d}" for d in ds], "entropy: first → last"]
  lines = [f"**{title}**", "", f"At step {steps[-1]}, mean ± std over seeds (n = reached / seeds where not all "
           "did).", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, v in summary["variants"].items():
    n_seeds = len(v["seeds"])
    reach, drift = v["steps_to_threshold"]["mean_std_n"], v["easy_drift"]["mean_std_n"]
    count = lambda x: "" if x[2] == n_seeds else f" (n = {x[2]}/{n_seeds})"
    cells = [f"{name} (n={n_seeds})",
             (_ms(reach, 0) + count(reach)) if reach[2] else f"not reached (0/{n_seeds})",
             (_ms(drift, 1) + count(drift)) if drift[2] else "—",
             *[_ms(v["accuracy"][str(d)][-1], 3) for d in ds], _ms(v["accuracy"]["all"][-1], 3),
             *[_ms(v["tokens"][str(d)][-1], 1) for d in ds],
             f"{v['entropy'][0][0]:.4f} → {v['entropy'][-1][0]:.4f}"]
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "Held-out accuracy (all levels) at each evaluation:", "",
            "| step | " + " | ".join(summary["variants"]) + " |", "|" + "---|" * (1 + len(summary["variants"]))]
  for i, s in enumerate(steps):
    lines.append(f"| {s} | " + " | ".join(_ms(v["accuracy"]["all"][i], 3) for v in summary["variants"].values())
                 + " |")
  return "\n".join(lines) + "\n"


def plot(summary: dict, path: str, title: str) -> str:
  """Accuracy (row 1) and tokens (row 2) against steps, all levels then each level; entropy, steps to the
  threshold and the easy-answer drift (row 3). Lines are means over seeds, bands +- std."""
  import matplotlib  # matplotlib is slow to import: only where a plot is drawn
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # matplotlib is slow to import: only where a plot is drawn

  levels = ["all"] + [str(d) for d in summary["difficulties"]]
  steps = np.array(summary["steps"])
  names = list(summary["variants"])
  fig, axes = plt.subplots(3, len(levels), figsize=(3.6 * len(levels), 9.5), squeeze=False)

  def band(ax, ms, label):
    m = np.array(ms)
    ax.plot(steps, m[:, 0], label=label)
    ax.fill_between(steps, m[:, 0] - m[:, 1], m[:, 0] + m[:, 1], alpha=0.2)

  for j, lv in enumerate(levels):
    for row, key, label in ((0, "accuracy", "held-out accuracy"), (1, "tokens", "response tokens")):
      ax = axes[row, j]
      for name in names:
        band(ax, summary["variants"][name][key][lv], name)
      ax.set_title(f"{label}, {'all levels' if lv == 'all' else f'd={lv}'}", fontsize=9)
      ax.set_xlabel("step")
      ax.grid(alpha=0.3)
  axes[0, 0].axhline(summary["threshold"], color="gray", lw=0.8, ls="--")
  axes[0, 0].legend(fontsize=7)
  ax = axes[2, 0]
  for name in names:
    band(ax, summary["variants"][name]["entropy"], name)
  ax.set_title("rollout token entropy", fontsize=9)
  ax.set_xlabel("step")
  ax.grid(alpha=0.3)
  for ax, key, label in ((axes[2, 1] if len(levels) > 1 else None, "steps_to_threshold",
                          f"steps to accuracy ≥ {summary['threshold']}"),
                         (axes[2, 2] if len(levels) > 2 else None, "easy_drift",
                          f"tokens d={summary['easiest']}: late − at convergence")):
    if ax is None:
      continue
    ms = np.array([summary["variants"][n][key]["mean_std_n"][:2] for n in names], np.float64)
    ax.bar(range(len(names)), np.nan_to_num(ms[:, 0]), yerr=np.nan_to_num(ms[:, 1]), capsize=3)
    ax.set_xticks(range(len(names)), names, rotation=20, fontsize=7)
    ax.set_title(label, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
  for ax in axes[2, 3:]:
    ax.axis("off")
  fig.suptitle(title)
  fig.tight_layout()
  storage.save_figure(fig, path, dpi=100)
  plt.close(fig)
  return path
