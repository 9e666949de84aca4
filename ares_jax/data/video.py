"""Videos as the Qwen2.5-VL processor takes them: sampled frames at the model's size, and their rate.

A video is a file (mp4 / webm / mkv / mov, decoded with PyAV), a folder of frame images (sorted by name),
or frames given directly (a list of PIL images or uint8 [H, W, 3] arrays, or one [T, H, W, 3] array).
The rules are qwen-vl-utils' (`fetch_video`, `smart_nframes`, the `VIDEO_*` constants of its
vision_process.py), which is how Qwen2.5-VL's own training and evaluation prepare videos:

- a file is sampled at `fps` frames a second: nframes = total_frames / video_fps * fps, clamped to
  [min_frames, min(max_frames, total_frames)] and floored to a multiple of FRAME_FACTOR (the temporal
  patch, 2); indices = linspace(0, total_frames - 1, nframes).round(); the sampled frames' rate is
  nframes / total_frames * video_fps (what `second_per_grid_ts` is computed from);
- folders and frame lists are frames already sampled (qwen-vl-utils takes them as they are, at `fps`;
  here at most `max_frames` of them);
- an odd frame count is made even by repeating the last frame (qwen-vl-utils' frame lists, transformers'
  video patchify); a one-frame file becomes two equal frames where qwen-vl-utils refuses it;
- frames are resized to smart_resize(h, w, factor, min_pixels, max_pixels) with max_pixels =
  max(min(max_pixels, total_pixels / nframes * FRAME_FACTOR), int(min_pixels * 1.05)): long videos get
  smaller frames, so a clip's token count stays bounded. Every frame of a clip gets the size of its
  first (qwen-vl-utils resizes listed frames one by one, with its image bounds; the processor needs one
  size per clip). Resizing is PIL bicubic; qwen-vl-utils uses torchvision bicubic with antialiasing, so
  pixels may differ from its output by rounding, never in size or count.

Untrusted files cannot exhaust memory: a file is refused before any frame is decoded when its container
says it is too long (`max_duration_s`, `max_source_frames`) or its frames too large
(`max_source_pixels`); only the sampled frames are kept, each resized as soon as it is decoded, so at most
one full-resolution frame is held at a time.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Iterator, Sequence

import av
import numpy as np
from PIL import Image

# qwen-vl-utils' constants (vision_process.py)
FRAME_FACTOR = 2
FPS = 2.0
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)  # 90% of a 128k-token context
MAX_RATIO = 200

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v")
FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
REASONS = ("missing", "undecodable", "too_long", "too_large", "no_frames")


class VideoError(ValueError):
  """A video that cannot be used; `reason` (one of REASONS) is what a skipped row is counted under."""

  def __init__(self, reason: str, detail: str):
    assert reason in REASONS, reason
    super().__init__(f"{reason}: {detail}")
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class VideoSettings:
  """How videos are sampled and sized (qwen-vl-utils' defaults), and the limits an untrusted file must
  pass before it is decoded. `factor` is the vision tower's patch x merge size (28 for Qwen2.5-VL)."""

  fps: float = FPS
  min_pixels: int = VIDEO_MIN_PIXELS
  max_pixels: int = VIDEO_MAX_PIXELS
  total_pixels: int = VIDEO_TOTAL_PIXELS
  min_frames: int = FPS_MIN_FRAMES
  max_frames: int = FPS_MAX_FRAMES
  factor: int = 28
  # Limits on the source: a 2-hour film at 60 fps has 432k frames; 8K is 33M pixels a frame.
  max_duration_s: float = 4 * 3600.0
  max_source_frames: int = 1_000_000
  max_source_pixels: int = 7680 * 4320

  def __post_init__(self):
    checks = {"fps": self.fps > 0, "min_pixels": 0 < self.min_pixels <= self.max_pixels,
              "total_pixels": self.total_pixels > 0, "min_frames": 0 < self.min_frames <= self.max_frames,
              "factor": self.factor > 0, "max_duration_s": self.max_duration_s > 0,
              "max_source_frames": self.max_source_frames > 0, "max_source_pixels": self.max_source_pixels > 0}
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
      raise ValueError(f"bad video settings {bad}: {self}")


@dataclasses.dataclass(frozen=True)
class Clip:
  """A video as the processor takes it: `frames` uint8 [T, H, W, 3] (T even, H and W multiples of the
  settings' factor) and `fps`, the rate of the sampled frames (seconds per temporal patch = 2 / fps)."""

  frames: np.ndarray
  fps: float

  def __post_init__(self):
    f = self.frames
    if not (isinstance(f, np.ndarray) and f.dtype == np.uint8 and f.ndim == 4 and f.shape[-1] == 3 and len(f)):
      raise ValueError(f"Clip.frames must be uint8 [T, H, W, 3], got {getattr(f, 'dtype', type(f))} "
                       f"{getattr(f, 'shape', '')}")
    if not self.fps > 0:
      raise ValueError(f"Clip.fps must be > 0, got {self.fps}")


def num_frames(total_frames: int, video_fps: float, s: VideoSettings) -> int:
  """qwen-vl-utils' `smart_nframes` for fps sampling: the number of frames kept from a file (1 for a
  one-frame file, which the caller pads)."""
  if total_frames < FRAME_FACTOR:
    return total_frames
  lo = math.ceil(s.min_frames / FRAME_FACTOR) * FRAME_FACTOR
  hi = math.floor(min(s.max_frames, total_frames) / FRAME_FACTOR) * FRAME_FACTOR
  n = total_frames / video_fps * s.fps
  n = min(max(n, lo), hi, total_frames)
  return max(math.floor(n / FRAME_FACTOR) * FRAME_FACTOR, FRAME_FACTOR)


def frame_indices(total_frames: int, n: int) -> np.ndarray:
  """The `n` frames kept of `total_frames`: evenly spaced from the first to the last, rounded half to
  even (torch.round, as qwen-vl-utils)."""
  return np.round(np.linspace(0, total_frames - 1, n)).astype(np.int64)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: float) -> tuple[int, int]:
  """qwen-vl-utils' smart_resize: sides multiples of `factor`, area within [min_pixels, max_pixels],
  aspect ratio kept as closely as possible."""
  if max(height, width) / max(min(height, width), 1) > MAX_RATIO:
    raise VideoError("undecodable", f"aspect ratio of {width}x{height} is over {MAX_RATIO}")
  h = max(factor, round(height / factor) * factor)
  w = max(factor, round(width / factor) * factor)
  if h * w > max_pixels:
    beta = math.sqrt(height * width / max_pixels)
    h = max(factor, math.floor(height / beta / factor) * factor)
    w = max(factor, math.floor(width / beta / factor) * factor)
  elif h * w < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h = math.ceil(height * beta / factor) * factor
    w = math.ceil(width * beta / factor) * factor
  return h, w


def frame_size(height: int, width: int, nframes: int, s: VideoSettings) -> tuple[int, int]:
  """The (height, width) every frame of an `nframes`-frame clip gets: the per-frame bound shrinks with
  the frame count so that the whole clip stays within `total_pixels`."""
  max_pixels = max(min(s.max_pixels, s.total_pixels / nframes * FRAME_FACTOR), int(s.min_pixels * 1.05))
  return smart_resize(height, width, s.factor, s.min_pixels, max_pixels)


def load_clip(video: Any, s: VideoSettings = VideoSettings()) -> Clip:
  """A video (a file or folder path, a list of frame paths, PIL images or arrays, or a [T, H, W, 3]
  array) as a `Clip`; raises VideoError."""
  if isinstance(video, (str, os.PathLike)):
    path = os.fspath(video)
    if os.path.isdir(path):
      names = sorted(n for n in os.listdir(path) if n.lower().endswith(FRAME_EXTENSIONS))
      return _from_frames([os.path.join(path, n) for n in names], s, path)
    if not os.path.exists(path):
      raise VideoError("missing", f"{path}: no such file or folder")
    return _decode_file(path, s)
  if isinstance(video, np.ndarray) and video.ndim == 4:
    video = list(video)
  if isinstance(video, (list, tuple)):
    return _from_frames(list(video), s, f"<{len(video)} frames>")
  raise VideoError("undecodable", f"not a video: {type(video).__name__}")


def _resized(frame: Image.Image | np.ndarray, size: tuple[int, int]) -> np.ndarray:
  img = frame if isinstance(frame, Image.Image) else Image.fromarray(frame)
  img = img.convert("RGB")
  h, w = size
  if img.size != (w, h):
    img = img.resize((w, h), resample=Image.Resampling.BICUBIC)
  return np.asarray(img, np.uint8)


def _even(frames: list[np.ndarray]) -> np.ndarray:
  if len(frames) % FRAME_FACTOR:
    frames = frames + [frames[-1]] * (FRAME_FACTOR - len(frames) % FRAME_FACTOR)
  return np.stack(frames)


def _open_frame(frame: Any, s: VideoSettings, where: str) -> Image.Image | np.ndarray:
  """A listed frame, opened (its size checked from the header before its pixels are decoded)."""
  if isinstance(frame, np.ndarray):
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
      raise VideoError("undecodable", f"{where}: a frame array must be uint8 [H, W, 3], got {frame.dtype} {frame.shape}")
    return frame
  if isinstance(frame, Image.Image):
    return frame
  path = os.fspath(frame)
  try:
    img = Image.open(path)
  except FileNotFoundError:
    raise VideoError("missing", f"{path}: no such frame") from None
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise VideoError("undecodable", f"{path}: {e}") from None
  if img.size[0] * img.size[1] > s.max_source_pixels:
    raise VideoError("too_large", f"{path}: {img.size[0]}x{img.size[1]} > {s.max_source_pixels} pixels")
  return img


def _from_frames(frames: Sequence[Any], s: VideoSettings, where: str) -> Clip:
  if not frames:
    raise VideoError("no_frames", f"{where}: no frames")
  if len(frames) > s.max_frames:
    raise VideoError("too_long", f"{where}: {len(frames)} frames > max_frames {s.max_frames}")
  out: list[np.ndarray] = []
  size = None
  for frame in frames:
    img = _open_frame(frame, s, where)
    if size is None:
      w, h = img.size if isinstance(img, Image.Image) else img.shape[1::-1]
      size = frame_size(h, w, len(frames) + len(frames) % FRAME_FACTOR, s)
    try:
      out.append(_resized(img, size))
    except (OSError, ValueError) as e:
      raise VideoError("undecodable", f"{where}: {e}") from None
  return Clip(_even(out), float(s.fps))


def _decode_file(path: str, s: VideoSettings) -> Clip:
  try:
    with av.open(path) as container:
      if not container.streams.video:
        raise VideoError("no_frames", f"{path}: no video stream")
      stream = container.streams.video[0]
      video_fps = float(stream.average_rate or stream.guessed_rate or 0)
      duration = (float(stream.duration * stream.time_base) if stream.duration and stream.time_base
                  else container.duration / av.time_base if container.duration else None)
      w, h = stream.codec_context.width, stream.codec_context.height
      if w * h > s.max_source_pixels:
        raise VideoError("too_large", f"{path}: {w}x{h} frames > {s.max_source_pixels} pixels")
      if duration is not None and duration > s.max_duration_s:
        raise VideoError("too_long", f"{path}: {duration:.0f} s > {s.max_duration_s:.0f} s")
      total = int(stream.frames) or _count_packets(container, stream, s, path)
      if total > s.max_source_frames:
        raise VideoError("too_long", f"{path}: {total} frames > {s.max_source_frames}")
      if total == 0:
        raise VideoError("no_frames", f"{path}: no frames")
      if video_fps <= 0:
        video_fps = total / duration if duration else s.fps
    clip, decoded = _sample(path, total, video_fps, s)
    if clip is None:  # the header over-counted: sample again from the frames that are there
      if decoded == 0:
        raise VideoError("no_frames", f"{path}: no frame decodes")
      clip, _ = _sample(path, decoded, video_fps, s)
    return clip
  except (av.FFmpegError, OSError) as e:  # av's errors are not all OSError or ValueError
    raise VideoError("undecodable", f"{path}: {e}") from None


def _count_packets(container: Any, stream: Any, s: VideoSettings, path: str) -> int:
  """Frames of a container that does not record its count (webm, mkv): its video packets, demuxed but
  not decoded; the file is rewound after."""
  n = 0
  for packet in container.demux(stream):
    if packet.size:
      n += 1
      if n > s.max_source_frames:
        raise VideoError("too_long", f"{path}: over {s.max_source_frames} frames")
  container.seek(0)
  return n


def _frames(path: str) -> Iterator[Any]:
  with av.open(path) as container:
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    yield from container.decode(stream)


def _sample(path: str, total: int, video_fps: float, s: VideoSettings) -> tuple[Clip | None, int]:
  """(the clip of `total` frames sampled, frames decoded); the clip is None when the file holds fewer than
  the frames wanted (then every frame was decoded, and their count is returned)."""
  n = num_frames(total, video_fps, s)
  wanted = frame_indices(total, n)
  keep: dict[int, int] = {}  # frame number -> how many times it is sampled
  for i in wanted.tolist():
    keep[i] = keep.get(i, 0) + 1
  last, size, out, i = int(wanted[-1]), None, [], -1
  frames = _frames(path)
  try:
    for i, frame in enumerate(frames):
      if frame.width * frame.height > s.max_source_pixels:  # a stream may change its size midway
        raise VideoError("too_large", f"{path}: frame {i} is {frame.width}x{frame.height} > {s.max_source_pixels} pixels")
      if i in keep:
        if size is None:
          size = frame_size(frame.height, frame.width, n + n % FRAME_FACTOR, s)
        out += [_resized(frame.to_image(), size)] * keep[i]
      if i == last:
        return Clip(_even(out), n / total * video_fps), i + 1
  finally:
    frames.close()  # closes the container now, not when the generator is collected
  return None, i + 1
