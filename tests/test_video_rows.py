"""Video rows: Video-R1's JSON, `video` / `videos` columns, `<video>` placeholders, bad videos skipped by
reason with their location, and clips crossing processes as arrays."""

from __future__ import annotations

import collections
import json
import logging

import numpy as np
import pytest
from PIL import Image

from ares_jax.data import prompts, reader
from ares_jax.data.processor import QwenVLProcessor
from ares_jax.data.prompts import PromptStream, RowSource
from ares_jax.data.template import PromptTemplate, ensure_chat_template
from ares_jax.data.tokenizer import tiny_tokenizer
from ares_jax.data.video import Clip, VideoSettings
from ares_jax.evaluation.benchmarks import with_options
from test_video import write_clip


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
  tok = ensure_chat_template(tiny_tokenizer(str(tmp_path_factory.mktemp("tok"))))
  return QwenVLProcessor.create(tok, min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16,
                                video=VideoSettings(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 8))


def _stream(rows, proc):
  return PromptStream(RowSource(rows), proc, PromptTemplate(proc.tokenizer, instruction=""), 400)


def video_r1(root):
  """A Video-R1 JSON beside its media: a good video row, a good image row, then bad ones."""
  (root / "videos").mkdir()
  (root / "images").mkdir()
  write_clip(root / "videos" / "dot.mp4")  # 2 s at 10 fps of 112x56: 4 frames at 2 fps
  (root / "videos" / "junk.mp4").write_bytes(b"junk" * 100)
  Image.new("RGB", (56, 56), "red").save(root / "images" / "pic.png")
  rows = [
      {"problem_id": 1, "problem": "Which way does the dot move?", "data_type": "video",
       "problem_type": "multiple choice", "options": ["A. left", "B. right"], "process": "<think>x</think>",
       "solution": "<answer>B</answer>", "path": "./videos/dot.mp4", "data_source": "synthetic-dots"},
      {"problem_id": 2, "problem": "How many red squares?", "data_type": "image", "problem_type": "numerical",
       "options": [], "solution": "<answer>1</answer>", "path": "./images/pic.png", "data_source": "synthetic"},
      {"problem_id": 3, "problem": "Where?", "data_type": "video", "problem_type": "free-form", "options": [],
       "solution": "<answer>here</answer>", "path": "./videos/nowhere.mp4", "data_source": "x"},
      {"problem_id": 4, "problem": "What?", "data_type": "video", "problem_type": "OCR", "options": [],
       "solution": "<answer>y</answer>", "path": "./videos/junk.mp4", "data_source": "x"},
      {"problem_id": 5, "problem": "Hear?", "data_type": "audio", "problem_type": "OCR", "options": [],
       "solution": "<answer>y</answer>", "path": "./a.wav", "data_source": "x"},
  ]
  path = root / "Video-R1-mini.json"
  path.write_text(json.dumps(rows))
  return path


def test_video_r1_json_rows_bad_videos_skipped_counted_and_located(tmp_path, proc, caplog):
  path = video_r1(tmp_path)
  skipped = collections.Counter()
  rows = reader.read_rows(str(path), skipped=skipped)
  assert dict(skipped) == {"malformed": 1} and [r.id for r in rows] == ["1", "2", "3", "4"]
  v, im = rows[0], rows[1]
  assert v.videos == (str(tmp_path / "videos" / "dot.mp4"),) and v.images == ()
  assert im.images == (str(tmp_path / "images" / "pic.png"),) and im.videos == ()
  assert v.answer == "B" and im.answer == "1" and v.options == {"A": "left", "B": "right"}
  assert v.question == "Which way does the dot move?\nOptions:\nA. left\nB. right"
  assert with_options(v) == v  # the evaluation does not list the options twice
  assert v.extra["problem_type"] == "multiple choice" and v.source == "synthetic-dots"
  assert v.location == f"{path}:0"
  stream = _stream(rows, proc)
  with caplog.at_level(logging.WARNING):
    exs = [stream.encode(i) for i in range(len(rows))]
  assert [e is not None for e in exs] == [True, True, False, False]
  assert stream.skipped == {"video_missing": 1, "video_undecodable": 1}
  assert f"{path}:2: video_missing" in caplog.text and f"{path}:3: video_undecodable" in caplog.text
  p = exs[0].prompt
  assert p.has_videos and not p.has_images
  assert p.video_grid_thw.tolist() == [[2, 4, 8]] and p.pixel_values_videos.shape == (64, 1176)
  assert p.second_per_grid_ts.tolist() == [1.0]
  assert (p.ids == proc.video_token_id).sum() == 16 and exs[1].prompt.has_images
  head = reader.head(str(path))
  assert head.layout == "Video-R1 JSON" and head.usable == 4 and head.skipped == {"malformed": 1}


def test_other_json_files_are_refused_and_folders_skip_them(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"a": 1}))
  with pytest.raises(ValueError, match="Video-R1's layout"):
    reader.read_rows(str(tmp_path / "config.json"))
  (tmp_path / "rows.jsonl").write_text(json.dumps({"question": "q", "answer": "1"}) + "\n")
  assert reader.data_files(str(tmp_path)) == [str(tmp_path / "rows.jsonl")]


def test_jsonl_video_columns_and_placeholders(tmp_path, proc):
  write_clip(tmp_path / "a.mp4")
  (tmp_path / "frames").mkdir()
  for i in range(3):
    Image.new("RGB", (56, 56), (80 * i, 0, 0)).save(tmp_path / "frames" / f"{i}.png")
  lines = [
      {"id": "v1", "question": "Before <video> and after.", "answer": "\\boxed{1}", "video": "a.mp4"},
      {"id": "v2", "question": "<image>Compare <video> with <video>", "answer": "2", "images": ["frames/0.png"],
       "videos": ["a.mp4", ["frames/0.png", "frames/1.png", "frames/2.png"]]},
      {"id": "v3", "question": "Frames of one video", "answer": "3", "video": ["frames/2.png", "frames/1.png"]},
      {"id": "v4", "question": "<video> and <video>?", "answer": "4", "video": "a.mp4"},
  ]
  (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
  rows = reader.read_rows(str(tmp_path / "rows.jsonl"))
  frames = tuple(str(tmp_path / "frames" / f"{i}.png") for i in range(3))
  assert rows[0].videos == (str(tmp_path / "a.mp4"),)
  assert rows[1].videos == (str(tmp_path / "a.mp4"), frames)
  assert rows[2].videos == ((frames[2], frames[1]),)
  stream = _stream(rows, proc)
  exs = [stream.encode(i) for i in range(len(rows))]
  assert exs[3] is None and stream.skipped == {"placeholder_mismatch": 1}
  text = proc.tokenizer.decode(exs[0].prompt.ids)
  body = text.split("<|im_start|>user\n")[1]
  assert body.startswith("Before <|vision_start|><|video_pad|>") and "<|vision_end|> and after." in body
  two = proc.tokenizer.decode(exs[1].prompt.ids).split("<|im_start|>user\n")[1]
  assert two.startswith("<|vision_start|><|image_pad|>") and two.index("Compare") < two.index("<|video_pad|>")
  assert exs[1].prompt.video_grid_thw.tolist() == [[2, 4, 8], [2, 4, 4]]  # 3 frames pad to 4
  np.testing.assert_allclose(exs[1].prompt.second_per_grid_ts, [1.0, 1.0])  # frame lists: at fps 2
  assert exs[2].prompt.video_grid_thw.tolist() == [[1, 4, 4]]


def test_clips_cross_processes_as_arrays_and_rates():
  frames = np.arange(2 * 56 * 56 * 3, dtype=np.uint8).reshape(2, 56, 56, 3)
  decoded = {0: ("ok", ([np.zeros((28, 28, 3), np.uint8)], [Clip(frames, 1.25), Clip(frames[:1], 3.0)])),
             1: ("skip", ("video_too_long", "long")), 2: ("ok", ([], []))}
  back = prompts._unpack(prompts._pack(decoded))
  assert back[1] == ("skip", ("video_too_long", "long")) and back[2] == ("ok", ([], []))
  images, clips = back[0][1]
  assert len(images) == 1 and [c.fps for c in clips] == [1.25, 3.0]
  np.testing.assert_array_equal(clips[0].frames, frames)
  np.testing.assert_array_equal(clips[1].frames, frames[:1])


def test_the_config_sets_the_video_settings():
  from ares_jax import settings  # imports JAX: only this test needs it
  from tiny_configs import load_config
  c = load_config("tiny.py")
  assert settings.video(c) == VideoSettings()  # qwen-vl-utils' defaults
  c.processor.video_fps, c.processor.video_max_frames = 1.0, 16
  assert settings.video(c) == VideoSettings(fps=1.0, max_frames=16)


def test_tfds_builds_refuse_video_rows_by_name():
  from ares_jax.data import build  # imports tensorflow_datasets: only this test needs it
  row = reader.Row(id="v", location="f.jsonl:1", question="<video>?", answer="1", videos=("a.mp4",))
  with pytest.raises(reader.BadRow) as e:
    build.prepare_images(row, build.ImageSettings())
  assert e.value.reason == "video_unsupported"
