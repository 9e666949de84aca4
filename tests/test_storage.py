"""ares_jax.storage and its users, locally and on `gs://` (a GCS API on loopback: fake-gcs-server through
ares_jax.gcs_emulator, fixtures `gcs` / `bucket` in conftest.py; gcsfs and tensorstore both talk to it).

Covers issue 12 items 1 (storage) and 7 (writes): atomic reports, a torn metrics line on resume, the
exported policy written shard by shard into a folder that appears whole, and a tiny AEPO run whose
metrics, curves, TensorBoard events and policy all land in a `gs://` workdir.
"""

from __future__ import annotations

import json
import os
import struct

import jax
import numpy as np
import pytest

from ares_jax import settings as settings_lib
from ares_jax import models, storage
from ares_jax.models import hf_io
from ares_jax.train import curves as curves_lib
from ares_jax.train import metrics as metrics_lib
from tiny_configs import load_config


@pytest.fixture(params=["local", "gs"])
def base(request, tmp_path):
  """A folder for run outputs: a local one, or `gs://<new bucket>/run` on the emulator."""
  if request.param == "local":
    return str(tmp_path / "run")
  return request.getfixturevalue("bucket") + "/run"


def _leftovers(folder: str) -> list[str]:
  return [n for n in storage.listdir(folder) if n.startswith(".")]


def test_atomic_write_failure_keeps_the_old_file(base):
  p = f"{base}/report.json"
  storage.write_json(p, {"version": 1})
  with pytest.raises(RuntimeError, match="killed"):
    with storage.atomic_open(p, "w") as f:
      f.write('{"version": 2, "half')
      raise RuntimeError("killed mid-write")
  assert storage.read_json(p) == {"version": 1}
  assert _leftovers(base) == []
  storage.write_json(p, {"version": 2})
  assert storage.read_json(p) == {"version": 2} and _leftovers(base) == []


def test_torn_last_line_is_dropped_on_read_and_cut_before_appending(base, caplog):
  p = f"{base}/metrics.jsonl"
  storage.append_lines(p, ['{"step": 1}', '{"step": 2}'])
  storage.write_bytes(p, storage.read_bytes(p) + b'{"step": 3, "lo')  # a kill in the middle of a write
  assert storage.read_jsonl(p) == [{"step": 1}, {"step": 2}]
  assert "torn last line" in caplog.text
  storage.append_lines(p, ['{"step": 3}'])  # never glued onto the torn fragment
  assert storage.read_jsonl(p) == [{"step": 1}, {"step": 2}, {"step": 3}]
  assert storage.read_text(p).endswith('{"step": 3}\n')
  storage.write_text(p, '{"step": 1}\nnot json\n{"step": 3}\n')  # corruption before the end is an error
  with pytest.raises(ValueError, match="line 2"):
    storage.read_jsonl(p)


def test_metrics_resume_drops_a_torn_last_line_and_continues(base):
  w = metrics_lib.MetricsWriter(base)
  for step in (1, 2, 3):
    w.write(step, {"loss": 1.0 / step})
  w.close()
  p = f"{base}/metrics.jsonl"
  storage.write_bytes(p, storage.read_bytes(p) + b'{"step": 4, "loss": 0.2')  # killed while writing step 4
  w = metrics_lib.MetricsWriter(base, resume_step=3)  # the step-3 checkpoint
  w.write(4, {"loss": 0.25})
  w.close()
  assert [r["step"] for r in metrics_lib.read_metrics(base)] == [1, 2, 3, 4]
  assert metrics_lib.read_metrics(base)[-1]["loss"] == 0.25
  loss = curves_lib.Panel("loss", "loss", (curves_lib.Series("loss", "loss"),))
  assert storage.exists(curves_lib.plot_curves(base, (loss,), "step"))


def _records(data: bytes) -> list[bytes]:
  """The payloads of a TFRecord stream (TensorBoard event file), checking every length and CRC."""
  from tensorboardX.record_writer import masked_crc32c
  out, i = [], 0
  while i < len(data):
    header = data[i:i + 8]
    (n,) = struct.unpack("Q", header)
    assert struct.unpack("I", data[i + 8:i + 12])[0] == masked_crc32c(header)
    payload = data[i + 12:i + 12 + n]
    assert struct.unpack("I", data[i + 12 + n:i + 16 + n])[0] == masked_crc32c(payload)
    out.append(payload)
    i += 16 + n
  return out


def test_tensorboard_event_files_on_gs_are_whole_records(bucket):
  w = metrics_lib.MetricsWriter(f"{bucket}/run")
  for step in range(1, 4):
    w.write(step, {"loss": 1.0 / step, "kl": 0.1})
  w.close()
  files = storage.listdir(f"{bucket}/run/tensorboard")
  assert len(files) == 1 and "tfevents" in files[0]
  records = _records(storage.read_bytes(f"{bucket}/run/tensorboard/{files[0]}"))
  assert len(records) >= 1 + 3 * 2  # the file version record, then 2 scalars per step
  assert sum(b"loss" in r for r in records) == 3
  # Past its size bound an event object is left as it is and the next records go to a new one.
  ev = metrics_lib._EventObject(f"{bucket}/ev/events.out.tfevents.1", roll_bytes=10)
  for chunk in (b"a" * 12, b"b" * 3, b"c" * 20):
    ev.write(chunk)
    ev.flush()
  ev.write(b"d")
  ev.close()
  assert storage.listdir(f"{bucket}/ev") == ["events.out.tfevents.1", "events.out.tfevents.1.00001",
                                             "events.out.tfevents.1.00002"]
  assert storage.read_bytes(f"{bucket}/ev/events.out.tfevents.1") == b"a" * 12
  assert storage.read_bytes(f"{bucket}/ev/events.out.tfevents.1.00001") == b"bbb" + b"c" * 20
  assert storage.read_bytes(f"{bucket}/ev/events.out.tfevents.1.00002") == b"d"


@pytest.fixture(scope="module")
def tiny_model():
  """The tiny config's model with random values (no initialiser to compile: only shapes matter here)."""
  from flax import linen as nn
  mcfg = settings_lib.model(load_config("tiny.py").model)
  rng = np.random.default_rng(0)
  shapes = nn.unbox(models.abstract_params(mcfg))
  return mcfg, jax.tree.map(lambda s: jax.numpy.asarray(rng.standard_normal(s.shape), s.dtype), shapes)


def test_save_hf_streams_one_tensor_at_a_time_into_shards(base, tiny_model):
  from ares_jax.data.tokenizer import load_tokenizer, tiny_tokenizer
  mcfg, params = tiny_model
  entries = hf_io._export_plan(mcfg, params)
  biggest = max(e.nbytes for e in entries)
  total = sum(e.nbytes for e in entries)
  gathered = []

  def gather(x):
    gathered.append(x.nbytes)
    return jax.device_get(x)

  policy = f"{base}/policy"
  hf_io.save_hf(policy, mcfg, params, tokenizer=tiny_tokenizer(), max_shard_bytes=64 << 10, gather=gather)
  # One gather per HF tensor (a layer of a parameter), never the whole tree nor a whole stacked leaf.
  assert gathered == [e.nbytes for e in entries] and max(gathered) == biggest < total / 4
  files = storage.listdir(policy)
  shards = [f for f in files if f.endswith(".safetensors")]
  assert len(shards) > 2 and "config.json" in files and "tokenizer.json" in files
  index = storage.read_json(f"{policy}/model.safetensors.index.json")
  assert sorted(set(index["weight_map"].values())) == shards
  assert index["metadata"]["total_size"] == total
  sizes = {e.name: e.nbytes for e in entries}
  for name in shards:  # at most the bound, unless one tensor alone is larger
    held = [sizes[t] for t, f in index["weight_map"].items() if f == name]
    assert len(held) == 1 or sum(held) <= 64 << 10
    assert storage.path(f"{policy}/{name}").stat().length <= max(sum(held), 64 << 10) + 8192  # + header
  assert _leftovers(base) == []
  config2, params2 = models.load_hf(policy)
  assert config2.text == mcfg.text and config2.vision == mcfg.vision
  jax.tree.map(np.testing.assert_array_equal, params2, jax.device_get(params))
  assert len(load_tokenizer(policy)) == len(tiny_tokenizer())


def test_a_failed_export_never_reads_as_a_whole_policy(base, tiny_model):
  """Locally the previous policy stays whole (the new one is renamed into place when complete). On gs://,
  which has no folder rename, the export writes in place with config.json last: after a failure there is
  no config.json and load_hf refuses the folder in one line, before downloading anything."""
  mcfg, params = tiny_model
  policy = f"{base}/policy"
  hf_io.save_hf(policy, mcfg, params, max_shard_bytes=64 << 10)
  before = {n: storage.read_bytes(f"{policy}/{n}") for n in storage.listdir(policy)}
  calls = []

  def dies(x):
    calls.append(1)
    if len(calls) == 5:
      raise RuntimeError("preempted mid-export")
    return jax.device_get(x)

  changed = jax.tree.map(lambda a: a + 1, params)
  with pytest.raises(RuntimeError, match="preempted"):
    hf_io.save_hf(policy, mcfg, changed, max_shard_bytes=64 << 10, gather=dies)
  if storage.is_remote(base):
    assert "config.json" not in storage.listdir(policy)
    with pytest.raises(FileNotFoundError, match="no config.json: not a finished folder"):
      models.load_hf(policy)
  else:
    assert {n: storage.read_bytes(f"{policy}/{n}") for n in storage.listdir(policy)} == before
  assert _leftovers(base) == []
  hf_io.save_hf(policy, mcfg, changed, max_shard_bytes=64 << 10)  # the next export replaces it whole
  assert sorted(storage.listdir(policy)) == sorted(before)
  _, params2 = models.load_hf(policy)
  jax.tree.map(np.testing.assert_array_equal, params2, jax.device_get(changed))


def test_sharded_export_loads_in_transformers(tmp_path, tiny_model):
  from safetensors import safe_open
  from transformers import Qwen2_5_VLForConditionalGeneration
  mcfg, params = tiny_model
  hf_io.save_hf(str(tmp_path / "policy"), mcfg, params, max_shard_bytes=64 << 10)
  model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path / "policy"),
                                                                   output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  index = json.loads((tmp_path / "policy" / "model.safetensors.index.json").read_text())
  name = "model.layers.1.mlp.down_proj.weight"
  with safe_open(str(tmp_path / "policy" / index["weight_map"][name]), framework="numpy") as f:
    want = f.get_tensor(name)
  got = dict(model.named_parameters())
  got = got.get(name, got.get(name.replace("model.", "model.language_model.", 1)))
  np.testing.assert_array_equal(got.detach().numpy(), want)


@pytest.mark.slow
def test_tiny_aepo_writes_everything_to_a_gs_workdir(bucket, tmp_path, monkeypatch):
  """A 1-step AEPO run with a `gs://` workdir: metrics, curves, TensorBoard events, orbax checkpoints
  (through tensorstore's GCS client) and the exported policy (weights, config, tokenizer) land in the bucket,
  nothing lands locally, and the policy loads back from there."""
  from ares_jax.data.tokenizer import load_tokenizer
  from ares_jax.stages import aepo as aepo_stage
  from ares_jax.train.checkpoint import Checkpointer
  from test_aepo_stage import tiny_rl_config

  monkeypatch.chdir(tmp_path)
  work = f"{bucket}/aepo"
  c = tiny_rl_config(work, 1)
  c.data.images = False
  c.warm_start.steps = 0
  c.rollout.max_response_length = 16
  out = aepo_stage.run(c)
  rows = metrics_lib.read_metrics(work)
  assert [r["step"] for r in rows] == [1] and rows == out["history"]
  assert storage.path(f"{work}/curves.png").stat().length > 10_000
  assert any("tfevents" in n for n in storage.listdir(f"{work}/tensorboard"))
  assert Checkpointer(f"{work}/checkpoints").steps() == [0, 1]
  assert "reference" in storage.listdir(f"{work}/checkpoints")
  policy = f"{work}/policy"
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(storage.listdir(policy))
  assert not [n for n in storage.listdir(work) if n.startswith(".")]  # no temporary leftovers
  assert os.listdir(tmp_path) == []  # nothing went to a local folder (e.g. one named after the URL)
  mcfg, params = models.load_hf(policy)
  assert mcfg.text.num_layers == 2 and len(load_tokenizer(policy)) > 0


def test_compilation_cache_on_gs(bucket):
  """`compilation_cache_dir=gs://...` (main.setup_compilation): JAX's persistent cache reaches object
  stores through epath too, so compiled programs land in the bucket."""
  from jax._src import compilation_cache  # reset_cache: the cache is set up once per process otherwise
  import ml_collections
  from ares_jax import main
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  saved = {n: getattr(jax.config, n) for n in names}
  try:
    main.setup_compilation(ml_collections.ConfigDict({"compilation_cache_dir": f"{bucket}/xla_cache"}))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    compilation_cache.reset_cache()
    jax.jit(lambda x: jax.numpy.cos(x) * 5 - 2)(jax.numpy.ones(11)).block_until_ready()
    assert any(n.endswith("-cache") for n in storage.listdir(f"{bucket}/xla_cache"))
  finally:
    for n, v in saved.items():
      jax.config.update(n, v)
    compilation_cache.reset_cache()


def test_the_emulator_refuses_a_bad_bucket_name_and_leaves_no_server(monkeypatch):
  from ares_jax import gcs_emulator
  stopped = []
  real_stop = gcs_emulator.Emulator.stop

  def stop(self, *args, **kwargs):  # the server of the failed start, to check that it ended
    real_stop(self, *args, **kwargs)
    stopped.append(self.process)

  monkeypatch.setattr(gcs_emulator.Emulator, "stop", stop)
  with pytest.raises(ValueError, match=r"bucket 'b': the emulator answered 400 .*invalid bucket name"):
    gcs_emulator.start(buckets=["b"])
  assert len(stopped) == 1 and stopped[0].poll() is not None
