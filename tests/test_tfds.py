"""TFDS + Grain input pipeline: data/build.py converts the released layouts into an array_record dataset
with resized, encoded images (bad rows skipped and counted), data/tfds_source.py reads it through Grain,
and an AEPO run on it resumed after a kill continues the same prompt order."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ares_jax import settings as settings_lib
from ares_jax.data import build as build_lib
from ares_jax.data import tfds_source
from ares_jax.data.processor import QwenVLProcessor
from ares_jax.data.prompts import PromptStream, RowSource, in_eval_split
from ares_jax.data.reader import load_images, read_rows
from ares_jax.data.template import PromptTemplate, ensure_chat_template
from ares_jax.data.tokenizer import tiny_tokenizer
from tiny_configs import load_config, small_rl

TINY = build_lib.ImageSettings(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)  # configs/tiny.py's bounds
SIZES = [(60, 40), (300, 200), (28, 140), (90, 90), (17, 33), (250, 250)]


def _png(path_or_none, size, seed):
  img = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8))
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  if path_or_none is not None:
    with open(path_or_none, "wb") as f:
      f.write(buf.getvalue())
  return buf.getvalue()


def virl39k_folder(root, n_good=14):
  """A ViRL39K-style folder: 39Krelease.parquet (question with <image> placeholders, \\boxed{} answer,
  image as a list of relative paths, pass rates with -1 = not annotated) + images/; three bad rows."""
  os.makedirs(root / "images")
  rows = []
  for i in range(n_good):
    names = [f"images/v{i}_{k}.png" for k in range(1 + (i % 3 == 0))]
    for k, name in enumerate(names):
      _png(root / name, SIZES[(i + k) % len(SIZES)], seed=100 * i + k)
    q = "<image> and <image>: which has more red?" if len(names) == 2 else f"<image>What is {i} + 1?"
    rows.append(dict(qid=f"virl-{i}", question=q, answer=f"\\boxed{{{i + 1}}}", image=names,
                     PassRate_32BTrained=0.25 * (i % 4), PassRate_7BBase=-1.0 if i % 2 else 0.5,
                     category="math", source=f"src{i % 3}"))
  (root / "images" / "corrupt.png").write_bytes(b"this is not a png")
  rows += [dict(qid="virl-missing", question="<image>Area?", answer="\\boxed{2}", image=["images/nope.png"],
                PassRate_32BTrained=0.5, PassRate_7BBase=0.5, category="math", source="src0"),
           dict(qid="virl-corrupt", question="<image>Angle?", answer="\\boxed{30}", image=["images/corrupt.png"],
                PassRate_32BTrained=0.5, PassRate_7BBase=0.5, category="math", source="src0"),
           dict(qid="virl-empty", question="<image>Side?", answer="", image=["images/v0_0.png"],
                PassRate_32BTrained=0.5, PassRate_7BBase=0.5, category="math", source="src0")]
  pq.write_table(pa.Table.from_pylist(rows), root / "39Krelease.parquet", row_group_size=5)
  return root


def easyr1_parquet(path, n_good=8):
  """An EasyR1-style parquet: problem / answer / images as embedded {bytes, path} structs; bad rows:
  corrupt bytes and a placeholder count that differs from the image count."""
  rows = [dict(id=f"easy-{i}", problem=f"<image>How many sides? ({i})", answer=str(3 + i),
               images=[dict(bytes=_png(None, SIZES[i % len(SIZES)], seed=i), path=None)]) for i in range(n_good)]
  rows += [dict(id="easy-corrupt", problem="<image>Sides?", answer="4", images=[dict(bytes=b"\x89PNG junk", path=None)]),
           dict(id="easy-mismatch", problem="<image><image>Sides?", answer="4",
                images=[dict(bytes=_png(None, (40, 40), seed=99), path=None)]),
           dict(id="easy-thin", problem="<image>Length?", answer="4",  # aspect ratio 300: the processor refuses
                images=[dict(bytes=_png(None, (600, 2), seed=98), path=None)])]
  pq.write_table(pa.Table.from_pylist(rows), path)
  return path


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
  tok = ensure_chat_template(tiny_tokenizer(str(tmp_path_factory.mktemp("tok"))))
  return QwenVLProcessor.create(tok, min_pixels=TINY.min_pixels, max_pixels=TINY.max_pixels)


@pytest.fixture(scope="module")
def virl(tmp_path_factory):
  """A ViRL39K folder and its TFDS conversion (a held-out fraction large enough for a few rows)."""
  root = virl39k_folder(tmp_path_factory.mktemp("ViRL39K"))
  settings = build_lib.BuildSettings((str(root),), str(tmp_path_factory.mktemp("tfds")), eval_fraction=0.25,
                                     images=TINY, workers=2)
  return root, settings, build_lib.build(settings)


def _records(path, split):
  return [tfds_source.to_row(r) for r in tfds_source._builder(path).as_data_source(split=split)]


def _tfds_config(path, workdir="", shuffle=True, seed=0):
  c = load_config("tiny.py")
  c.data.kind, c.data.tfds_dir, c.data.shuffle, c.seed, c.workdir = "tfds", path, shuffle, seed, workdir
  return c


def _tfds(path, **kw):
  return settings_lib.tfds(_tfds_config(path, **kw))


def test_virl39k_folder_round_trips_with_resized_images_and_counted_bad_rows(virl, proc):
  root, settings, result = virl
  assert result.skipped == {"missing_image": 1, "unreadable_image": 1, "missing_answer": 1}
  assert result.counts["train"] + result.counts["eval"] == 14 and result.counts["eval"] > 0
  assert tfds_source.resolve(settings.out) == tfds_source.resolve(os.path.dirname(result.path)) == result.path
  meta = json.load(open(os.path.join(result.path, "metadata.json")))
  assert meta["skipped"] == result.skipped and (meta["min_pixels"], meta["max_pixels"]) == (3136, 50176)
  train, held = _records(result.path, "train"), _records(result.path, "eval")
  # The held-out split is the id-hash split of kind=files: disjoint from training, nothing lost.
  assert {r.id for r in held} == {f"virl-{i}" for i in range(14) if in_eval_split(f"virl-{i}", 0.25)}
  assert not {r.id for r in train} & {r.id for r in held}
  assert [r.id for r in train] == [f"virl-{i}" for i in range(14) if not in_eval_split(f"virl-{i}", 0.25)]
  originals = {r.id: r for r in read_rows(str(root))}
  for rec in train + held:
    orig = originals[rec.id]
    assert (rec.question, rec.answer, rec.location, rec.source, rec.category) == \
        (orig.question, orig.answer, orig.location, orig.source, orig.category)
    assert rec.pass_rate == orig.pass_rate and rec.extra == orig.extra and rec.options == {}
    assert rec.extra["PassRate_32BTrained"] == orig.extra["PassRate_32BTrained"]
    stored, source = load_images(rec), load_images(orig)
    assert len(stored) == len(source) >= 1
    for s, o in zip(stored, source):  # PNG is lossless: exactly the processor's resize of the original
      np.testing.assert_array_equal(np.asarray(s), proc.resize(o))
  assert originals["virl-1"].pass_rate is None and originals["virl-0"].pass_rate == 0.5  # -1 = not annotated
  sizes = {load_images(r)[0].size for r in train + held}
  assert len(sizes) > 2 and all(w % 28 == 0 and h % 28 == 0 and 3136 <= w * h <= 50176 for w, h in sizes)


@pytest.mark.slow
def test_easyr1_parquet_command_line_with_eval_files_and_overwrite(tmp_path):
  src = easyr1_parquet(tmp_path / "train.parquet")
  held = tmp_path / "held.jsonl"  # the ARES cold-start layout; one id also in the training file
  _png(tmp_path / "h.png", (50, 70), seed=7)
  held.write_text("\n".join(json.dumps(r) for r in [
      {"id": "easy-2", "question": "How many sides? (2)", "answer": "5", "image": "h.png", "response": "5",
       "source": "cold", "pass_rate": 0.25},
      {"id": "cold-1", "question": "What is 1+1?", "answer": "\\boxed{2}", "response": "r", "difficulty": 3}]) + "\n")
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "ares_jax.data.build", f"--src={src}", f"--out={out}", f"--eval_src={held}",
         f"--min_pixels={TINY.min_pixels}", f"--max_pixels={TINY.max_pixels}", "--image_format=jpeg", "--workers=2"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
  assert done.returncode == 0, done.stderr[-3000:]
  path = str(out / "ares_prompts" / "1.0.0")
  assert f"dataset: {path}" in done.stdout and "train: 7 rows, eval: 2 rows" in done.stdout
  assert "skipped 3 rows: placeholder_mismatch 1, unreadable_image 1, unresizable 1" in done.stdout
  assert "1 training-file rows dropped" in done.stdout
  assert all(f"{src}:{k}: " in done.stderr for k in (8, 9, 10))  # each bad row logged with file:row
  train, ev = _records(path, "train"), _records(path, "eval")
  assert [r.id for r in train] == [f"easy-{i}" for i in range(8) if i != 2]
  assert [(r.id, r.response, r.pass_rate, r.difficulty, r.source) for r in ev] == [
      ("easy-2", "5", 0.25, None, "cold"), ("cold-1", "r", None, 3, "held")]
  assert ev[1].images == () and ev[1].answer == "2"
  img = Image.open(io.BytesIO(train[0].images[0]))
  assert img.format == "JPEG" and img.size == (84, 56)  # 60x40 at the processor's size
  settings = build_lib.BuildSettings((str(src),), str(out), eval_fraction=0.5, images=TINY)
  with pytest.raises(FileExistsError, match="--overwrite"):
    build_lib.build(settings)
  rebuilt = build_lib.build(dataclasses.replace(settings, overwrite=True))
  assert rebuilt.path == path and rebuilt.counts == {"train": 5, "eval": 3}  # easy-2, 5, 7 hash below 0.5
  assert sorted(os.listdir(out)) == ["ares_prompts"] and os.listdir(out / "ares_prompts") == ["1.0.0"]
  tfds_source._builder.cache_clear()
  assert [r.id for r in _records(path, "eval")] == ["easy-2", "easy-5", "easy-7"]


def test_tfds_prompts_are_the_files_prompts(virl, proc):
  """Same rows, same template, same processor: identical token ids and pixels from both kinds of source."""
  root, settings, result = virl
  template = PromptTemplate(proc.tokenizer)
  tfds_stream = PromptStream(tfds_source.source(_tfds(result.path), 1), proc, template, 512)
  held = [r for r in read_rows(str(root)) if in_eval_split(r.id, 0.25)]
  files_stream = PromptStream(RowSource(held), proc, template, 512)
  a, b = tfds_stream.first(100), files_stream.first(100)
  assert len(a) == len(b) == result.counts["eval"]
  for x, y in zip(a, b):
    assert x.row.id == y.row.id
    np.testing.assert_array_equal(x.prompt.ids, y.prompt.ids)
    np.testing.assert_array_equal(x.prompt.pixel_values, y.prompt.pixel_values)
    np.testing.assert_array_equal(x.prompt.image_grid_thw, y.prompt.image_grid_thw)


def test_an_endless_tfds_source_without_a_usable_prompt_fails_clearly(virl, proc):
  _, _, result = virl
  stream = PromptStream(tfds_source.source(_tfds(result.path), 0), proc, PromptTemplate(proc.tokenizer), 8)
  with pytest.raises(ValueError, match="no usable row"):  # after one epoch, not never
    stream.take(0, 1)
  assert dict(stream.skipped) == {"too_long": result.counts["train"]}


def test_grain_orders_the_training_split_by_epoch(virl):
  import grain
  _, _, result = virl
  n = result.counts["train"]
  src = tfds_source.source(_tfds(result.path, seed=0), 0)
  assert src.epoch_size == n and len(src) == sys.maxsize  # endless: Grain repeats, the stream never wraps
  ids = [src[p].id for p in range(3 * n)]
  file_order = [r.id for r in _records(result.path, "train")]
  epochs = [ids[k * n:(k + 1) * n] for k in range(3)]
  assert all(sorted(e) == sorted(file_order) for e in epochs)  # each epoch: every training row once
  assert len({tuple(e) for e in epochs + [file_order]}) == 4  # a different permutation every epoch
  assert [src[p].id for p in range(n)] == epochs[0]  # deterministic
  other = tfds_source.source(_tfds(result.path, seed=1), 0)
  assert [other[p].id for p in range(n)] != epochs[0]  # seeded by config.seed
  plain = tfds_source.source(_tfds(result.path, shuffle=False), 0)
  assert [plain[p].id for p in range(2 * n)] == file_order * 2
  # A checkpoint's data position is the state of a Grain iterator over the same dataset.
  it = iter(src.dataset.to_iter_dataset())
  it.set_state(tfds_source.grain_state(n + 3))
  assert next(it).id == ids[n + 3]
  for _ in range(2):
    next(it)
  assert it.get_state() == tfds_source.grain_state(n + 6)
  held = tfds_source.source(_tfds(result.path), 1)
  assert len(held) == held.epoch_size == result.counts["eval"]
  assert [held[i].id for i in range(len(held))] == [r.id for r in _records(result.path, "eval")]
  assert isinstance(src.dataset, grain.MapDataset)


@pytest.mark.slow
def test_tfds_aepo_run_resumed_after_a_kill_continues_the_same_prompt_order(tmp_path, monkeypatch):
  """Text rows (an ARES-layout JSONL): one compiled shape per program keeps three short runs cheap; the
  image path of the same source is covered above."""
  from ares_jax.stages import aepo as aepo_stage
  src = tmp_path / "prompts.jsonl"
  src.write_text("\n".join(json.dumps({"id": f"t{i}", "question": f"What is {i} + 1?", "answer": str(i + 1)})
                           for i in range(10)) + "\n")
  path = build_lib.build(build_lib.BuildSettings((str(src),), str(tmp_path / "tfds"), eval_fraction=0.0,
                                                 images=TINY)).path
  taken = []
  original = PromptStream.take

  def recording_take(self, position, count):
    out, nxt = original(self, position, count)
    taken[-1].append([e.row.id for e in out])
    return out, nxt

  monkeypatch.setattr(PromptStream, "take", recording_take)

  def run(workdir, total_steps):
    c = small_rl(_tfds_config(path, str(tmp_path / workdir)))
    c.stage, c.total_steps, c.checkpoint_every = "aepo", total_steps, 1
    c.mesh.fsdp = 1
    c.warm_start.steps = 0
    c.rollout.max_response_length = 8
    c.grading_workers = 1
    taken.append([])
    assert aepo_stage.run(c)["skipped_rows"] == {}
    return taken[-1]

  straight = run("straight", 4)
  first = run("resumed", 2)  # "killed" after its step-2 checkpoint
  rest = run("resumed", 4)
  assert len(straight) == 4 and len(first) == 2 and len(rest) == 2
  assert first + rest == straight
  flat = [i for step in straight for i in step]  # 16 positions of 10 rows: the run crossed into epoch 2
  assert sorted(flat[:10]) == [f"t{i}" for i in range(10)] and flat[:10] != [f"t{i}" for i in range(10)]
  assert flat[10:] == [tfds_source.source(_tfds(path), 0)[p].id for p in range(10, 16)]
  assert flat[10:] != flat[:6]  # epoch 2 is a new permutation
