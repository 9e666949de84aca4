"""configs/tiny.py on a built-in video task (ares_jax/data/motion.py): does the clip get brighter or darker?

  python -m ares_jax.data.motion --task=fade --out=data/fade --rows=512               # clips + train.jsonl
  python -m ares_jax.data.motion --task=fade --out=data/fade --rows=128 --coldstart   # + coldstart.jsonl
  python -m ares_jax.main --config=configs/tiny_video.py                              # AdaCS, then AEPO

The clips are mp4 files read through the reader's `video` column and decoded by PyAV in the prompt
stream, as a released video dataset is. The cold-start pool's responses name an answer drawn at
random and AdaCS keeps the correct half; its 12 epochs teach the answer format and leave held-out accuracy
near chance, so what AEPO gains it reads from the order of the frames (README "Video": 0.45 -> 0.89 in
100 steps on seed 0). Frames are kept at 56 x 56 (4 x 4 patches) and
a clip of 8 frames at 4 fps is sampled at 4 fps: 4 temporal patches, 16 video tokens a prompt.
"""

import os
import runpy


def get_config():
  c = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py"))["get_config"]()
  c.workdir = "workdirs/tiny_video"
  c.data.kind = "files"
  c.data.paths = ("data/fade/train.jsonl",)
  c.adacs.pool_paths = ("data/fade/coldstart.jsonl",)
  c.data.eval_fraction = 0.125
  c.warm_start.steps = 0  # the synthetic task's warm start; here AdaCS teaches the format
  c.processor.update(dict(video_fps=4.0, video_min_pixels=56 * 56, video_max_pixels=56 * 56,
                          video_total_pixels=56 * 56 * 64, video_min_frames=4, video_max_frames=16))
  c.data.system_prompt = ""
  c.data.instruction = ""
  c.rollout.max_response_length = 32
  c.adacs.max_response_length = 32
  c.adacs.budget = 128
  # AdaCS keeps the pool's correct responses (half of it): 12 epochs teach the answer format while held-out
  # accuracy stays at chance, so the run shows what AEPO learns (30 epochs learn the clips by SFT alone)
  c.adacs.epochs = 12
  c.adacs.lr = 3e-3
  c.total_steps = 100
  c.eval.every = 10
  c.eval.prompts = 64
  c.optim.lr = 1e-4  # 3e-4 collapsed to one answer within 10 steps
  return c
