"""configs/tiny.py on the built-in video task (ares_jax/data/motion.py): which way does the dot move?

  python -m ares_jax.data.motion --out=data/motion --rows=512               # clips + train.jsonl
  python -m ares_jax.data.motion --out=data/motion --rows=128 --coldstart   # + coldstart.jsonl
  python -m ares_jax.main --config=configs/tiny_video.py                    # AdaCS, then AEPO

The clips are mp4 files read through the reader's `video` column and decoded by PyAV in the prompt
stream, as a released video dataset is. The cold-start pool's responses name a direction drawn at
random: AdaCS teaches the answer format and nothing about the direction, so AEPO starts near chance
and what it gains it reads from the order of the frames. Frames are kept at 56 x 56 (4 x 4 patches) and
a clip of 8 frames at 4 fps is sampled at 4 fps: 4 temporal patches, 16 video tokens a prompt.
"""

import os
import runpy


def get_config():
  c = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py"))["get_config"]()
  c.workdir = "workdirs/tiny_video"
  c.data.kind = "files"
  c.data.paths = ("data/motion/train.jsonl",)
  c.adacs.pool_paths = ("data/motion/coldstart.jsonl",)
  c.data.eval_fraction = 0.125
  c.warm_start.steps = 0  # the synthetic task's warm start; here AdaCS teaches the format
  c.processor.update(dict(video_fps=4.0, video_min_pixels=56 * 56, video_max_pixels=56 * 56,
                          video_total_pixels=56 * 56 * 64, video_min_frames=4, video_max_frames=16))
  c.data.system_prompt = ""
  c.data.instruction = ""
  c.rollout.max_response_length = 32
  c.adacs.max_response_length = 32
  c.adacs.budget = 128
  c.adacs.epochs = 30
  c.adacs.lr = 3e-3
  c.total_steps = 60
  c.eval.every = 10
  c.eval.prompts = 64
  c.optim.lr = 3e-4
  return c
