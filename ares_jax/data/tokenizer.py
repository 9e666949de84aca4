"""Tokenizers: a tiny byte-level BPE built locally, and real Hugging Face tokenizers from a folder.

No model hub is reachable from where ares_jax is developed and tested, yet the whole pipeline
(processor, inspect stage, sampling, rewards) needs a tokenizer with Qwen2.5-VL's special tokens.
`tiny_tokenizer()` trains one in milliseconds from a built-in math/reasoning corpus, laid out like
Qwen's (byte-level BPE with Qwen2's pre-tokenizer regex, special tokens after the BPE vocabulary),
caches it in a folder and returns it as a `transformers.PreTrainedTokenizerFast`. Its token ids
are fixed constants (`TINY_SPECIAL_IDS`), so a config file can name them without building it.
"""

from __future__ import annotations

import os
import random
import shutil
import string
import tempfile
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ares_jax import storage

if TYPE_CHECKING:  # transformers is slow to import; the configs import this module for constants
  from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

# Special tokens of Qwen2.5-VL (the first seven) plus the reasoning tags ARES prompts use.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
)
# Plain added tokens: kept by `decode(..., skip_special_tokens=True)` because rewards parse them.
REASONING_TOKENS: tuple[str, ...] = ("<think>", "</think>")

TINY_VOCAB_SIZE = 512
TINY_BPE_SIZE = TINY_VOCAB_SIZE - len(SPECIAL_TOKENS) - len(REASONING_TOKENS)
TINY_SPECIAL_IDS: dict[str, int] = {
    tok: TINY_BPE_SIZE + i for i, tok in enumerate(SPECIAL_TOKENS + REASONING_TOKENS)}
# Bump when the corpus or the recipe changes: the cache folder is keyed by it.
TINY_TOKENIZER_VERSION = 1

# Qwen2's pre-tokenizer split: contractions, letter runs, single digits, punctuation runs, spaces.
QWEN2_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                       r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

_CORPUS = """\
Solve the problem step by step, then put the final answer in \\boxed{}.
Let us think about the question carefully before we answer it.
First, we read the image: there is a triangle, a circle and a square on the grid.
The triangle has three sides and three angles; the sum of its interior angles is 180 degrees.
A square has four equal sides and four right angles, so its area is the side length squared.
The area of a circle with radius r is pi times r squared, and its circumference is 2 pi r.
Wait, let me check this again. The previous step assumed the figure was a rectangle.
Hmm, that does not look right. Let me verify the computation with another method.
Therefore the probability that both coins show heads is one quarter.
We factor the quadratic equation and find both roots; then we substitute them back.
The derivative of the function is zero at the maximum, so we solve for x.
Since the sequence is arithmetic, the common difference equals the second term minus the first.
In the right triangle, by the Pythagorean theorem, the hypotenuse squared equals the sum of squares.
The chart shows the number of students in each class; the largest bar belongs to class three.
Count the objects in the picture: there are red cubes, blue spheres and green cylinders.
How many objects are left after we remove all the small metal balls?
The answer must be an integer, so we round down and obtain the final result.
Simplify the fraction by dividing numerator and denominator by their greatest common divisor.
The angle opposite the longest side is the largest angle of the triangle.
If the perimeter of the rectangle is known, the width follows from the length.
Consider the expected value of the random variable over all possible outcomes.
The slope of the line through the two points is the change in y over the change in x.
Because the function is increasing on the interval, its minimum is at the left endpoint.
Multiply both sides of the inequality by a positive number; the direction does not change.
The volume of the cylinder equals the base area multiplied by the height.
Alternatively, we can count the complement and subtract it from the total.
So the correct option is B, because the other choices contradict the given conditions.
Let me double-check: substituting the value into the original equation gives a true statement.
The mean of the data set is the sum of the values divided by how many values there are.
The median is the middle value after sorting; the mode is the most frequent value.
Parallel lines cut by a transversal form equal corresponding angles.
The graph of the parabola opens upward, and its vertex gives the minimum value.
We need to find the length of the segment between the two marked points in the diagram.
The ratio of the areas of similar figures is the square of the ratio of their sides.
"""

_TEMPLATES = (
    "What is {a} + {b}? We add the numbers: {a} + {b} = {s}. The answer is \\boxed{{{s}}}.",
    "Compute {a} times {b}. Since {a} * {b} = {p}, the answer is \\boxed{{{p}}}.",
    "A rectangle has width {a} and length {b}. Its area is {a} * {b} = {p} and its perimeter is {q}.",
    "<think>The question asks for {a} minus {b}. So {a} - {b} = {d}.</think> The answer is \\boxed{{{d}}}.",
    "If x + {a} = {s}, then x = {s} - {a} = {b}. Check: {b} + {a} = {s}. Final answer: \\boxed{{{b}}}.",
    "There are {a} apples and {b} oranges in the image, so there are {s} fruits in total.",
    "The triangle has sides {a}, {b} and {c}. Is it a right triangle? We compare {a}^2 + {b}^2 with {c}^2.",
)


def tiny_corpus(seed: int = 0, repeats: int = 400) -> list[str]:
  """The fixed training text: the prose above plus template sentences with seeded random numbers."""
  rng = random.Random(seed)
  lines = _CORPUS.splitlines()
  for _ in range(repeats):
    a, b, c = rng.randint(0, 999), rng.randint(0, 999), rng.randint(1, 99)
    t = rng.choice(_TEMPLATES)
    lines.append(t.format(a=a, b=b, c=c, s=a + b, p=a * b, d=a - b, q=2 * (a + b)))
  return lines


def _train_tiny(folder: str) -> None:
  """Trains the tiny tokenizer and writes it with `save_pretrained` into `folder`."""
  # tokenizers + transformers are slow to import: only where a tokenizer is built
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast  # transformers is slow to import: only where it is used

  tok = Tokenizer(models.BPE())
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=TINY_BPE_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(tiny_corpus(), trainer)
  if tok.get_vocab_size() != TINY_BPE_SIZE:
    raise RuntimeError(f"tiny tokenizer: BPE training reached {tok.get_vocab_size()} tokens, not "
                       f"{TINY_BPE_SIZE}; the built-in corpus is too small for the vocabulary")
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
  tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in REASONING_TOKENS])
  for t, i in TINY_SPECIAL_IDS.items():
    if tok.token_to_id(t) != i:
      raise RuntimeError(f"tiny tokenizer: {t} got id {tok.token_to_id(t)}, expected {i}")
  fast = PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
      extra_special_tokens=list(SPECIAL_TOKENS[1:]), padding_side="left", model_max_length=32768)
  fast.save_pretrained(folder)


def default_cache_dir() -> str:
  """$ARES_JAX_CACHE, else $XDG_CACHE_HOME/ares_jax, else ~/.cache/ares_jax."""
  root = os.environ.get("ARES_JAX_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ares_jax")
  return root


def tiny_tokenizer(cache_dir: str | None = None) -> "PreTrainedTokenizerFast":
  """The tiny Qwen-style tokenizer, built on first use into `cache_dir` and loaded from there after.

  The folder is written under a temporary name and renamed into place, so concurrent builders
  (pytest-xdist workers, several hosts on a shared disk) never see a half-written tokenizer.
  """
  from transformers import PreTrainedTokenizerFast  # transformers is slow to import: only where it is used

  root = cache_dir or default_cache_dir()
  folder = os.path.join(root, f"tiny_tokenizer_v{TINY_TOKENIZER_VERSION}")
  if not os.path.exists(os.path.join(folder, "tokenizer.json")):
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=root, prefix=".tiny_tokenizer.")
    try:
      _train_tiny(tmp)
      try:
        os.rename(tmp, folder)
      except OSError:  # another process won the race; its folder is identical
        if not os.path.exists(os.path.join(folder, "tokenizer.json")):
          raise
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  return PreTrainedTokenizerFast.from_pretrained(folder, padding_side="left")


def word_token_table(tokenizer: Any, words: Sequence[str]) -> np.ndarray:
  """[vocab] bool: the tokens that decode to one of `words` (case and surrounding spaces and punctuation
  ignored), e.g. the trigger words of AEPO's `trigger_words` mode ("wait", "however", ...). A word the
  tokenizer splits into several tokens is not matched by any one of them."""
  wanted = {w.strip().lower() for w in words if w.strip()}
  if not wanted:
    raise ValueError("aepo.trigger_words holds no word")
  ids = list(range(len(tokenizer)))
  texts = tokenizer.batch_decode([[i] for i in ids])
  return np.array([t.strip().strip(string.punctuation).lower() in wanted for t in texts], bool)


def load_tokenizer(path: str) -> "PreTrainedTokenizerBase":
  """A tokenizer saved in a folder (a Qwen2.5-VL checkpoint or a `tiny_tokenizer` cache), local or on
  `gs://` (its small files are copied to a temporary local folder first: weights are not).

  Never downloads from a hub (local_files_only) and never runs code shipped with a checkpoint
  (trust_remote_code=False). Padding is on the left, as generation needs.
  """
  from transformers import AutoTokenizer  # transformers is slow to import: only where it is used

  if not storage.isdir(path):
    raise FileNotFoundError(f"tokenizer folder {path!r} does not exist (models are never downloaded: "
                            "point to a local copy of the checkpoint)")
  with storage.local_folder(path, lambda name: not name.endswith((".safetensors", ".bin"))) as local:
    tok = AutoTokenizer.from_pretrained(local, local_files_only=True, trust_remote_code=False)
  tok.padding_side = "left"
  missing = [t for t in SPECIAL_TOKENS if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id)]
  if missing:
    raise ValueError(f"tokenizer in {path} lacks the Qwen2.5-VL special tokens {missing}")
  return tok
