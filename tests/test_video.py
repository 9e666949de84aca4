"""Videos (data/video.py): qwen-vl-utils' sampling and sizing rules with numbers worked out by hand, PyAV
decoding of clips written here, frame folders and lists, and every reason a video is refused."""

from __future__ import annotations

import av
import numpy as np
import pytest
from PIL import Image

from ares_jax.data import video
from ares_jax.data.video import Clip, VideoError, VideoSettings

# 112x56 frames are already at the size these settings give (6272 = 28*28*8 pixels): nothing is resized,
# so a decoded frame can be compared with the one written.
SMALL = VideoSettings(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 8)


def write_clip(path, frames: int = 20, fps: int = 10, width: int = 112, height: int = 56, step: int = 5,
               codec: str = "libx264") -> None:
  """A white 8x8 dot on black moving `step` pixels a frame (right when step > 0, left when < 0)."""
  with av.open(str(path), "w") as c:
    s = c.add_stream(codec, rate=fps)
    s.width, s.height, s.pix_fmt = width, height, "yuv420p"
    for i in range(frames):
      a = np.zeros((height, width, 3), np.uint8)
      x = i * step if step > 0 else width - 8 + i * step
      a[height // 2 - 4:height // 2 + 4, x:x + 8] = 255
      for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
        c.mux(p)
    for p in s.encode():
      c.mux(p)


def dot_x(frame: np.ndarray) -> float:
  """The x centre of the bright pixels of a frame."""
  ys, xs = np.nonzero(frame.mean(-1) > 128)
  return float(xs.mean())


def test_frame_counts_follow_qwen_vl_utils_rules():
  s = VideoSettings()  # fps 2, frames in [4, 768], multiples of 2
  # 2 s at 10 fps: 20 / 10 * 2 = 4 frames; linspace(0, 19, 4) = 0, 6.33, 12.67, 19
  assert video.num_frames(20, 10.0, s) == 4
  assert video.frame_indices(20, 4).tolist() == [0, 6, 13, 19]
  # 3 s at 3 fps: 6 frames; linspace(0, 8, 6) = 0, 1.6, 3.2, 4.8, 6.4, 8
  assert video.num_frames(9, 3.0, s) == 6
  assert video.frame_indices(9, 6).tolist() == [0, 2, 3, 5, 6, 8]
  # 7 frames at 30 fps: 0.47 frames, raised to min_frames 4 (at most floor(7 / 2) * 2 = 6)
  assert video.num_frames(7, 30.0, s) == 4
  # 3 frames: min_frames 4 is capped by floor(3 / 2) * 2 = 2
  assert video.num_frames(3, 30.0, s) == 2
  # 2000 s at 1 fps: 4000 frames wanted, max_frames 768
  assert video.num_frames(2000, 1.0, s) == 768
  # 11 frames at 1 fps: 22 wanted, but at most floor(11 / 2) * 2 = 10 exist
  assert video.num_frames(11, 1.0, s) == 10
  # 11 frames at 2 fps sampled at 1.5 fps: 8.25, floored to 8
  assert video.num_frames(11, 2.0, VideoSettings(fps=1.5)) == 8
  # a custom max_frames of 5 floors to 4
  assert video.num_frames(100, 1.0, VideoSettings(max_frames=5)) == 4


def test_frame_size_follows_qwen_vl_utils_rules():
  s = VideoSettings()  # min 128*28*28 = 100352, max 768*28*28 = 602112, total 90316800
  # 480x640, 20 frames: 640*480 = 307200 is within bounds; sides round to 476x644
  assert video.frame_size(480, 640, 20, s) == (476, 644)
  # 1080x1920, 4 frames: 2073600 > 602112: beta = sqrt(2073600 / 602112) = 1.8558,
  # 1080 / 1.8558 / 28 = 20.78 -> 560, 1920 / 1.8558 / 28 = 36.95 -> 1008
  assert video.frame_size(1080, 1920, 4, s) == (560, 1008)
  # 768 frames: max_pixels = max(min(602112, 90316800 / 768 * 2 = 235200), 105369) = 235200;
  # beta = sqrt(2073600 / 235200) = 2.9693: 1080 / 2.9693 / 28 = 12.99 -> 336, 1920 / 2.9693 / 28 = 23.09 -> 644
  assert video.frame_size(1080, 1920, 768, s) == (336, 644)
  # 48x64: 3072 < 100352: beta = sqrt(100352 / 3072) = 5.7155: 274.3 -> 280, 365.8 -> 392
  assert video.frame_size(48, 64, 4, s) == (280, 392)


@pytest.mark.parametrize("step", [5, -5])
def test_mp4_decodes_the_sampled_frames_in_order(tmp_path, monkeypatch, step):
  path = tmp_path / "dot.mp4"
  write_clip(path, step=step)  # 20 frames, 2 s at 10 fps
  converted = []  # frames turned into pixels: only the sampled ones
  monkeypatch.setattr(video, "_resized", lambda f, size, real=video._resized: converted.append(1) or real(f, size))
  clip = video.load_clip(str(path), SMALL)
  assert len(converted) == 4
  assert clip.frames.shape == (4, 56, 112, 3) and clip.frames.dtype == np.uint8
  assert clip.fps == pytest.approx(4 / 20 * 10)  # nframes / total * video_fps
  # frames 0, 6, 13, 19: the dot's centre is at 4 + 5 i (right) or 108 - 5 i (left)
  want = [4 + 5 * i if step > 0 else 108 - 5 * i for i in (0, 6, 13, 19)]
  np.testing.assert_allclose([dot_x(f) for f in clip.frames], want, atol=1.5)


def test_webm_without_a_frame_count_and_resizing(tmp_path):
  path = tmp_path / "dot.webm"
  write_clip(path, frames=30, fps=10, width=64, height=48, step=1, codec="libvpx-vp9")
  with av.open(str(path)) as c:
    assert c.streams.video[0].frames == 0  # the container does not say: packets are counted
  clip = video.load_clip(str(path))
  # 3 s at 10 fps: 6 frames at 2 fps; 48x64 is raised to min_pixels: 280x392 (worked out above)
  assert clip.frames.shape == (6, 280, 392, 3) and clip.fps == pytest.approx(2.0)


def test_one_frame_file_is_padded_to_a_temporal_pair(tmp_path):
  path = tmp_path / "one.mp4"
  write_clip(path, frames=1)
  clip = video.load_clip(str(path), SMALL)
  assert clip.frames.shape == (2, 56, 112, 3)
  np.testing.assert_array_equal(clip.frames[0], clip.frames[1])


def test_frame_folders_and_lists_are_taken_as_sampled_and_padded(tmp_path):
  folder = tmp_path / "frames"
  folder.mkdir()
  colors = [(10 * i, 0, 0) for i in range(5)]
  for i, c in enumerate(colors):  # names sort as frame order; other files are ignored
    Image.new("RGB", (112, 56), c).save(folder / f"frame_{i:03d}.png")
  (folder / "notes.txt").write_text("not a frame")
  clip = video.load_clip(str(folder), SMALL)
  assert clip.frames.shape == (6, 56, 112, 3) and clip.fps == SMALL.fps
  assert [int(f[0, 0, 0]) for f in clip.frames] == [0, 10, 20, 30, 40, 40]  # the last repeated
  listed = video.load_clip([str(folder / f"frame_{i:03d}.png") for i in (4, 0)], SMALL)
  assert [int(f[0, 0, 0]) for f in listed.frames] == [40, 0]
  arrays = np.stack([np.full((48, 64, 3), v, np.uint8) for v in (1, 2, 3)])
  clip = video.load_clip(arrays, SMALL)  # 48x64 -> 56x56 (rounded to 28s, within bounds)
  assert clip.frames.shape == (4, 56, 56, 3) and clip.frames[:, 0, 0, 0].tolist() == [1, 2, 3, 3]
  pil = video.load_clip([Image.new("RGB", (112, 56), "blue")] * 2, SMALL)
  assert pil.frames.shape == (2, 56, 112, 3) and tuple(pil.frames[0, 0, 0]) == (0, 0, 255)


def test_every_refusal_has_its_reason(tmp_path):
  good = tmp_path / "good.mp4"
  write_clip(good)  # 2 s, 20 frames of 112x56

  def reason(v, s=SMALL):
    with pytest.raises(VideoError) as e:
      video.load_clip(v, s)
    return e.value.reason

  assert reason(str(tmp_path / "nowhere.mp4")) == "missing"
  assert reason([str(tmp_path / "nowhere.png")]) == "missing"
  (tmp_path / "junk.mp4").write_bytes(b"\x00not a video" * 100)
  assert reason(str(tmp_path / "junk.mp4")) == "undecodable"
  (tmp_path / "junk.png").write_bytes(b"not an image")
  assert reason([str(tmp_path / "junk.png")]) == "undecodable"
  # the limits are checked from the container, before a frame is decoded
  assert reason(str(good), VideoSettings(max_duration_s=1.5)) == "too_long"
  assert reason(str(good), VideoSettings(max_source_frames=19)) == "too_long"
  assert reason(str(good), VideoSettings(max_source_pixels=112 * 56 - 1)) == "too_large"
  assert reason([np.zeros((56, 112, 3), np.uint8)] * 5, VideoSettings(max_frames=4)) == "too_long"
  (tmp_path / "empty").mkdir()
  assert reason(str(tmp_path / "empty")) == "no_frames"
  assert reason([]) == "no_frames"
  with av.open(str(tmp_path / "sound.mkv"), "w") as c:  # a container of sound only
    s = c.add_stream("pcm_s16le", rate=8000)
    for _ in range(3):
      frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
      frame.sample_rate = 8000
      for p in s.encode(frame):
        c.mux(p)
  assert reason(str(tmp_path / "sound.mkv")) == "no_frames"
  assert video.load_clip(str(good), SMALL).frames.shape[0] == 4  # and the limits pass a good file


def test_settings_and_clips_refuse_bad_values():
  with pytest.raises(ValueError, match="min_pixels"):
    VideoSettings(min_pixels=10, max_pixels=5)
  with pytest.raises(ValueError, match="fps"):
    VideoSettings(fps=0)
  with pytest.raises(ValueError, match="uint8"):
    Clip(np.zeros((2, 28, 28, 3), np.float32), 2.0)
  with pytest.raises(ValueError, match="fps"):
    Clip(np.zeros((2, 28, 28, 3), np.uint8), 0.0)
