"""The prompt template: one user turn rendered by the tokenizer's own chat template, with the question's
images and videos at its `<image>` / `<video>` placeholders (without placeholders: images first, then
videos, then the text, the order of Qwen's chat template for content listed that way) and an instruction.

The same `PromptTemplate` renders RL prompts, AdaCS SFT prompts and evaluation prompts, so a policy is
trained and measured on the prompts it will be asked. The default instruction is the release's math
instruction (docs/design.md §11.1): reason step by step, final answer in `\\boxed{}`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

from absl import logging

from ares_jax import storage
from ares_jax.data.processor import IMAGE_PLACEHOLDER as VISION_IMAGE
from ares_jax.data.processor import VIDEO_PLACEHOLDER as VISION_VIDEO
from ares_jax.data.reader import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER

_MARKS = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
POSITIONS = ("after", "before")

# Qwen2-VL / Qwen2.5-VL's chat template (its processor's chat_template.json), for tokenizers saved
# without one (the built-in tiny tokenizer, checkpoints whose template lives only beside the processor).
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def ensure_chat_template(tokenizer: Any, folder: str | None = None) -> Any:
  """Gives `tokenizer` a chat template that renders images: its own when it has one, else the folder's
  `chat_template.json` / `chat_template.jinja` (where transformers saves a processor's), else Qwen's."""
  if tokenizer.chat_template and "image" in str(tokenizer.chat_template):
    return tokenizer
  for name in ("chat_template.jinja", "chat_template.json"):
    path = os.path.join(folder, name) if folder else ""
    if path and storage.exists(path):
      text = storage.read_text(path)
      tokenizer.chat_template = json.loads(text)["chat_template"] if name.endswith(".json") else text
      return tokenizer
  if folder:
    logging.info("the tokenizer in %s has no chat template for images; using Qwen2.5-VL's", folder)
  tokenizer.chat_template = QWEN_VL_CHAT_TEMPLATE
  return tokenizer


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
  """How a question becomes the text of a prompt (before the processor expands image tokens).

  `system`: None = the chat template's default system turn (Qwen: "You are a helpful assistant.");
  "" = no system turn (written in Qwen's turn format directly, since Qwen's template always adds one);
  any other text = that system turn. `instruction` goes `after` (default) or `before` the question.
  """

  tokenizer: Any = dataclasses.field(compare=False, repr=False)
  system: str | None = None
  instruction: str = MATH_INSTRUCTION
  position: str = "after"

  def __post_init__(self):
    if self.position not in POSITIONS:
      raise ValueError(f"config.data.instruction_position={self.position!r}: expected one of {POSITIONS}")

  def content(self, question: str, num_images: int, num_videos: int = 0) -> list[dict]:
    """The user turn as chat content: text, image and video parts in reading order. Raises ValueError
    when the question has `<image>` (`<video>`) placeholders but not exactly `num_images` (`num_videos`)."""
    pieces = _MARKS.split(question)  # text, mark, text, mark, ..., text
    marks = pieces[1::2]
    parts: list[dict] = []
    for mark, n, kind in ((IMAGE_PLACEHOLDER, num_images, "image"), (VIDEO_PLACEHOLDER, num_videos, "video")):
      given = marks.count(mark)
      if given and given != n:
        raise ValueError(f"{given} {mark} placeholders but {n} {kind}s")
      if not given:  # unplaced ones go first
        parts += [{"type": kind}] * n
    for k, text in enumerate(pieces):
      if k % 2:
        parts.append({"type": "image" if text == IMAGE_PLACEHOLDER else "video"})
      elif text:
        parts.append({"type": "text", "text": text})
    if self.instruction:
      if self.position == "after":
        sep = "\n" if parts and parts[-1]["type"] == "text" else ""
        parts.append({"type": "text", "text": sep + self.instruction})
      else:
        parts.insert(0, {"type": "text", "text": self.instruction + "\n"})
    return [p for p in parts if p.get("type") != "text" or p["text"]]

  def render(self, question: str, num_images: int, num_videos: int = 0) -> str:
    """The prompt text, ending where the assistant's answer starts."""
    content = self.content(question, num_images, num_videos)
    if self.system == "":
      vision = {"image": VISION_IMAGE, "video": VISION_VIDEO}
      body = "".join(vision[p["type"]] if p["type"] in vision else p["text"] for p in content)
      return f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"
    messages = [{"role": "user", "content": content}]
    if self.system is not None:
      messages.insert(0, {"role": "system", "content": self.system})
    return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
