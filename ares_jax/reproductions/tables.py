"""Per-difficulty held-out results over seeds: mean +- std, as JSON, a markdown table and a plot.

Input: for each row (a stage such as "after AdaCS", or an ablation variant) and seed, the `eval/*`
metrics of `evaluation.held_out.evaluate` (`eval/accuracy_d{d}`, `eval/length_d{d}`,
`eval/spearman_length_vs_difficulty`). The std is the sample standard deviation over seeds (ddof = 1;
0 for one seed)."""

from __future__ import annotations

import re

import numpy as np

from ares_jax import storage

METRICS = (("accuracy", "accuracy"), ("length", "tokens"))


def difficulties(evals: list[dict[str, float]]) -> list[int]:
  """The difficulties every evaluation in `evals` reports."""
  found = [{int(m.group(1)) for k in e if (m := re.fullmatch(r"eval/accuracy_d(\d+)", k))} for e in evals]
  return sorted(set.intersection(*found)) if found else []


def mean_std(values: list[float]) -> tuple[float, float]:
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summarize(per_seed: dict[str, dict[int, dict[str, float]]]) -> dict:
  """{row: {seed: eval metrics}} -> {"difficulties", "rows": {row: {"accuracy": {d: [mean, std]},
  "length": {...}, "accuracy_all", "length_all", "spearman": [mean, std], "seeds": n}}}."""
  ds = difficulties([e for seeds in per_seed.values() for e in seeds.values()])
  rows = {}
  for row, seeds in per_seed.items():
    evals = list(seeds.values())
    out = {"seeds": len(evals)}
    for key, _ in METRICS:
      out[key] = {str(d): mean_std([e[f"eval/{key}_d{d}"] for e in evals]) for d in ds}
      out[f"{key}_all"] = mean_std([e[f"eval/{key}"] for e in evals])
    out["spearman"] = mean_std([e.get("eval/spearman_length_vs_difficulty", float("nan")) for e in evals])
    rows[row] = out
  return {"difficulties": ds, "rows": rows}


def markdown(summary: dict, title: str = "") -> str:
  """One line per row: accuracy and tokens per difficulty, overall, and Spearman(length, difficulty)."""
  ds = summary["difficulties"]
  head = (["", *[f"acc d={d}" for d in ds], "acc all", *[f"tokens d={d}" for d in ds], "tokens all",
           "Spearman(len, d)"])
  fmt = lambda ms, p: f"{ms[0]:.{p}f} ± {ms[1]:.{p}f}"
  lines = ([f"**{title}**", ""] if title else []) + ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row, r in summary["rows"].items():
    cells = ([fmt(r["accuracy"][str(d)], 3) for d in ds] + [fmt(r["accuracy_all"], 3)]
             + [fmt(r["length"][str(d)], 1) for d in ds] + [fmt(r["length_all"], 1), fmt(r["spearman"], 3)])
    lines.append(f"| {row} (n={r['seeds']}) | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot(summary: dict, path: str, title: str) -> str:
  """Accuracy and tokens against difficulty, one line per row with +- std error bars; a PNG at `path`."""
  import matplotlib  # matplotlib is slow to import: only where a plot is drawn
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # matplotlib is slow to import: only where a plot is drawn

  ds = summary["difficulties"]
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for ax, (key, label) in zip(axes, METRICS):
    for i, (row, r) in enumerate(summary["rows"].items()):
      m = np.array([r[key][str(d)] for d in ds])
      ax.errorbar(np.array(ds) + 0.04 * (i - len(summary["rows"]) / 2), m[:, 0], yerr=m[:, 1], marker="o",
                  capsize=3, label=row)
    ax.set_xlabel("difficulty")
    ax.set_xticks(ds)
    ax.set_ylabel(f"held-out {label}")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  storage.save_figure(fig, path, dpi=110)
  plt.close(fig)
  return path


def write(summary: dict, out_dir: str, name: str, title: str, extra: dict | None = None) -> tuple[str, str, str]:
  """`{out_dir}/{name}.json` (the summary plus `extra`), `.md` and `.png`."""
  base = f"{out_dir.rstrip('/')}/{name}"
  storage.write_json(base + ".json", dict(summary, **(extra or {})), indent=1)
  storage.write_text(base + ".md", markdown(summary, title))
  plot(summary, base + ".png", title)
  return base + ".json", base + ".md", base + ".png"
