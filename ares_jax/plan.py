"""Memory plans: every device program of one training step, compiled ahead of time for a topology.

  python -m ares_jax.plan --config=configs/aepo_7b.py --topology=v5p:2x2x1 [--json=PATH] [--config.x=y]

No accelerator is needed: `jax.experimental.topologies` describes a TPU slice's devices (with the
libtpu wheel installed), the config's mesh is laid over them, and the real run's jitted programs
(`sampling.sampler.rollout_chunk`, `train.sequences.score`, the `Updater`'s micro-step and apply) are
lowered with abstract arrays (`jax.ShapeDtypeStruct` with shardings) made by the real run's host
code from synthetic prompts of the config's shapes. XLA's `memory_analysis()` gives each program's
per-device arguments, outputs and temporaries; the state that lives beside a program (optimizer
moments, the reference policy, ...) is measured from the programs that create it. A program fits
when resident + peak <= `plan.usable` x HBM. Exits 1 when anything does not fit. The table goes to
stdout at the end; progress to stderr as it happens: each program as it starts compiling (its
arguments' shapes) and when done (seconds, memory), each size the chunk search tries (peak, fits or not).

Each program's per-device flops and bytes accessed come from XLA's `cost_analysis()`, and its roofline
time, max(flops / peak, bytes / bandwidth), from the chip's public figures (`chips`; none for cpu:N).
XLA counts a loop body once; `hlo_cost` adds the runs it leaves out of every loop whose trip count XLA
knows (the scanned decoder and vision layers, blockwise attention's tiles). A loop that stops on its data
stays once: a rollout chunk's figures are its prefill plus one decode step. After the
table, one line per stage: its predicted seconds per step, each program's time per call x its calls per step
at the expected lengths (`step_time`; `plan.prompt_tokens`, `plan.response_tokens`, `plan.mfu`).

`--topology=cpu:N` plans for N simulated CPU devices (HBM from `--config.plan.hbm_gib`), and the AEPO
stage uses `largest_rollout_chunk` on its own devices when `rollout.chunk_prompts` is 0.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

from absl import app, flags, logging

from ares_jax import chips, step_time, storage
from ares_jax import main as entry  # the --config flag and its one-line errors for bad overrides

GIB = 1 << 30  # compiled_memory.GIB: that module imports JAX, which must start after prepare_environment

_TOPOLOGY = flags.DEFINE_string("topology", "v5p:2x2x1", "A TPU topology name (v4:2x2x1, v5e:2x4, v5p:2x2x1, "
                                "v6e:2x4, ...) or cpu:N (N simulated CPU devices).")
_JSON = flags.DEFINE_string("json", None, "Also write the plan as JSON to this path.")

def prepare_environment(topology: str) -> None:
  """Before JAX starts: TPU topologies are compiled for from the CPU host (no TPU is claimed, so
  several processes may load libtpu); cpu:N needs N simulated devices."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  if topology.startswith("cpu:") and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    n = int(topology.split(":", 1)[1])
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()


def main(argv: list[str]) -> None:
  config = entry.config_from_flags(argv)
  prepare_environment(_TOPOLOGY.value)
  # JAX after prepare_environment: it reads JAX_PLATFORMS when imported
  from ares_jax import compiled_memory, memory_plan
  try:
    devices, hbm = compiled_memory.topology_devices(_TOPOLOGY.value, config.plan.hbm_gib)
    logging.info("planning stage %s for %s: %d devices of %.1f GiB; compiling each program (a 7B rollout: minutes)",
                 config.stage, _TOPOLOGY.value, len(devices), hbm)
    plans = memory_plan.plan_step(config, devices, hbm)
  except ValueError as e:
    sys.stderr.write(f"FATAL: {e}\n")
    sys.exit(2)
  usable = config.plan.usable
  device = chips.for_device(devices[0])
  rows = [p.row(usable, device) for p in plans]
  steps = step_time.step_seconds(config, rows, device, step_time.batch_shards(config, len(devices)))
  print("\n".join([format_table(rows, _TOPOLOGY.value, hbm, usable, device), ""] +
                  step_time.format_lines(config, steps, device)))
  if _JSON.value:
    storage.write_json(_JSON.value, report(rows, _TOPOLOGY.value, hbm, usable, device, steps, config.plan),
                       indent=1)  # local or gs://
  if not all(r["fits"] for r in rows):
    sys.exit(1)


def report(rows: list[dict[str, Any]], topology: str, hbm: float, usable: float,
           device: Optional[chips.Device] = None, steps: Optional[dict[str, Any]] = None,
           plan: Any = None) -> dict[str, Any]:
  """The JSON report: the table's rows (with flops, bytes_accessed, roofline_s), the chip figures used, and
  with `steps` (`step_time.step_seconds`) the predicted seconds per step of each stage with the calls behind
  them, at the expected lengths and utilisation of `plan` (config.plan)."""
  out = {"topology": topology, "hbm_gib": hbm, "usable": usable,
         "chip": device.describe() if device else None, "programs": rows}
  if steps is not None:
    out["step_seconds"] = steps
    out["step_assumptions"] = {k: plan[k] for k in ("prompt_tokens", "response_tokens", "mfu")}
  return out


def format_table(rows: list[dict[str, Any]], topology: str, hbm: float, usable: float,
                 device: Optional[chips.Device] = None) -> str:
  """The markdown table: memory in GiB per device, then XLA's cost per device and its roofline time."""
  head = ("program", "shapes", "args", "out", "temp", "resident", "peak", "verdict", "GFLOP", "GiB accessed",
          "roofline ms")
  lines = [f"memory plan for {topology}: {hbm:.1f} GiB HBM per device, usable {usable:.0%} (GiB per device)", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    verdict = "fits" if r["fits"] else "DOES NOT FIT"
    cost = " | ".join(_figure(r.get(k), scale) for k, scale in (("flops", 1e9), ("bytes_accessed", GIB),
                                                            ("roofline_s", 1e-3)))
    lines.append(f"| {r['name']} | {r['shapes']} | {r['args_gib']:.2f} | {r['out_gib']:.2f} | {r['temp_gib']:.2f} | "
                 f"{r['resident_gib']:.2f} | {r['peak_gib']:.2f} | {verdict} | {cost} |")
  if device:
    share = f" (1/{device.per_chip} chip per device)" if device.per_chip > 1 else ""
    roof = (f"roofline on {device.chip.name}{share}: {device.peak_flops / 1e12:.1f} TFLOP/s bf16, "
            f"{device.hbm_bandwidth / 1e9:.0f} GB/s per device")
  else:
    roof = "no roofline: no peak figures for these devices (chips.py)"
  lines += ["", "GFLOP and GiB accessed: per device, XLA's cost analysis with every loop of known trip count run "
            "that many times (hlo_cost: the scanned layers); a loop that stops on its data counted once (a rollout "
            f"chunk: prefill + one decode step); Pallas kernels not seen; {roof}."]
  return "\n".join(lines)


def _figure(value: Optional[float], scale: float) -> str:
  """Three significant figures (thousands grouped above 100); "-" where there is no figure."""
  if value is None:
    return "-"
  x = value / scale
  return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def cli() -> None:
  logging.set_verbosity(logging.INFO)  # progress: each program as it compiles, each probe of the chunk search
  app.run(main, flags_parser=entry.parse_flags)


if __name__ == "__main__":
  cli()
