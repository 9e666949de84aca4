"""The benchmark judge: is a model's response right? Pure functions over strings.

Two kinds of item (docs/design.md §11.3):
- multiple choice (the item has options, letter -> text): the choice is the letter in the last `\\boxed{}`,
  else an "answer is (X)" / "Answer: X" statement, else a lone letter on the last line; a boxed option
  *text* instead of a letter names the option whose text it is. It is right when it is the gold option,
  whether the gold answer is given as a letter or as the option's text.
- free form: the last balanced `\\boxed{...}` (nested braces kept), compared with the gold answer by
  normalised string equality or math-verify (gold first: `verify(gold, pred)` is not symmetric).
No answer found is wrong.

Public judges have failed in known ways; each is ruled out here and tested: a `\\boxed{([^}]+)}` regex
cuts `\\frac{1}{2}` at its first brace (we match braces); sorting option characters makes "12" equal
"21" (we never sort); a letters-only fallback makes any two numbers equal (two strings are only ever
compared whole); a bare `\\boxed{A}` does not parse as math (letters are compared as strings).

`judge` is what the grading pool runs (`data.grading.Grader(fn=judge)` in spawned workers): it imports
math-verify lazily and passes `timeout_seconds=None` / `parsing_timeout=None`, because math-verify's own
timeout uses `signal.alarm`, which fails outside a main thread; the pool times out the worker instead.
`extract` is the cheap, math-free reading of the same response that the reports show beside `correct`.
Model output is only ever parsed, never evaluated.
"""

from __future__ import annotations

import logging
import re
from typing import Mapping

from ares_jax.data.grading import last_boxed

LETTERS = "ABCDEFGH"  # VLMEvalKit's option columns

# "B", "(B)", "B.", "B)", "[B]", "B:" -- a whole string that names one letter.
_LETTER = re.compile(r"^[(\[]?\s*([A-H])\s*[)\].:]?$")
# "B. 12", "(B) 12", "B: 12" -- a letter that introduces the option's text.
_LETTER_THEN_TEXT = re.compile(r"^[(\[]?([A-H])(?:[)\]]\s*|[.:]\s+)\S")
# "the answer is (B)", "Answer: B", "answer is option C" -- the last one in the response counts.
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*(?:option\s*)?[(\[]?\s*([A-H])\s*[)\]]?(?![A-Za-z0-9])",
                        re.IGNORECASE)
_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|operatorname|mbox)\s*\{([^{}]*)\}")
_SPACING = re.compile(r"\\[,;:!]|\\quad|\\qquad|~|\\left|\\right|\s+")


def normalize(text: str) -> str:
  """A string form for exact comparison: `\\text{}`-style wrappers, `$`, spacing commands, whitespace and a
  trailing period removed, lower case. Nothing is reordered or dropped beyond that, so "12" != "21"."""
  s = text.strip()
  for _ in range(3):  # nested wrappers, e.g. \text{\textbf{B}}
    s = _WRAPPERS.sub(r"\1", s)
  s = _SPACING.sub("", s.replace("$", ""))
  return s.rstrip(".").lower()


def as_letter(text: str | None, letters: str = LETTERS) -> str | None:
  """The option letter that `text` names on its own ("B", "(B)", "\\text{B}", "B. 12"), if one of `letters`."""
  if text is None:
    return None
  s = text.strip()
  for _ in range(3):
    s = _WRAPPERS.sub(r"\1", s)
  s = s.replace("$", "").strip()
  m = _LETTER.match(s) or _LETTER_THEN_TEXT.match(s)
  return m.group(1) if m and m.group(1) in letters else None


def option_by_text(text: str, options: Mapping[str, str]) -> str | None:
  """The letter of the one option whose text equals `text` after `normalize`; None if none or several."""
  want = normalize(text)
  hits = [k for k, v in options.items() if want and normalize(str(v)) == want]
  return hits[0] if len(hits) == 1 else None


def gold_choice(gold: str, options: Mapping[str, str]) -> str | None:
  """The gold option's letter: `gold` is a letter ("C", "(C)") or the text of exactly one option."""
  boxed = last_boxed(gold)
  gold = boxed if boxed is not None else gold
  letter = as_letter(gold)
  return letter if letter is not None else option_by_text(gold, options)


def _last_line(text: str) -> str:
  lines = [ln for ln in text.strip().splitlines() if ln.strip()]
  return lines[-1] if lines else ""


def extract_choice(response: str, options: Mapping[str, str]) -> str | None:
  """The option letter a response chooses, without math: the boxed letter (or boxed option text), else
  the last "answer is (X)", else a lone letter on the last line. Letters must be keys of `options`."""
  letters = "".join(options)
  boxed = last_boxed(response)
  if boxed is not None:
    return as_letter(boxed, letters) or option_by_text(boxed, options)
  said = [m.group(1) for m in _ANSWER_IS.finditer(response) if m.group(1) in letters]
  if said:
    return said[-1]
  return as_letter(_last_line(response), letters)


def extract(response: str, options: Mapping[str, str] | None = None) -> str | None:
  """What the reports show as the extracted answer: the chosen letter for multiple choice (else the raw
  boxed text, which `judge` may still match to an option by value), the last boxed answer otherwise."""
  if options:
    choice = extract_choice(response, options)
    if choice is not None:
      return choice
  return last_boxed(response)


def same_answer(gold: str, pred: str) -> bool:
  """Whether a free-form prediction equals the gold answer: equal after `normalize`, or equal under
  math-verify with the gold parsed first (from `$gold$`; math-verify needs the dollars to read LaTeX)."""
  g, p = normalize(gold), normalize(pred)
  if not g or not p:
    return False
  if g == p:
    return True
  from math_verify import parse, verify  # math-verify (sympy) is slow to import: only the grading workers load it

  # Its "timeout is disabled" warning: the grading pool's per-item timeout is the limit here.
  logging.getLogger("math_verify").setLevel(logging.ERROR)

  gold_parsed = parse(f"${gold.strip().strip('$')}$", parsing_timeout=None)
  pred_parsed = parse(f"$\\boxed{{{pred}}}$", parsing_timeout=None)
  if not gold_parsed or not pred_parsed:
    return False
  return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def judge_choice(response: str, gold: str, options: Mapping[str, str]) -> bool:
  """Multiple choice: the response's chosen option is the gold option. A boxed value that is neither a
  letter nor an option's exact text chooses the one option it equals under math-verify (several: none)."""
  want = gold_choice(gold, options)
  choice = extract_choice(response, options)
  if choice is None:
    boxed = last_boxed(response)
    if boxed is None or not boxed.strip():
      return False
    hits = [k for k, v in options.items() if same_answer(str(v), boxed)]
    if len(hits) != 1:
      return False
    choice = hits[0]
  if want is not None:
    return choice == want
  return same_answer(gold, str(options[choice]))  # a gold value that is no option's exact text


def judge(response: str, gold: str, options: Mapping[str, str] | None = None) -> float:
  """1.0 if `response` answers the item right, else 0.0 (the grading pool's per-item function)."""
  if options:
    return float(judge_choice(response, gold, options))
  pred = last_boxed(response)
  if pred is None:
    return 0.0
  boxed_gold = last_boxed(gold)
  return float(same_answer(boxed_gold if boxed_gold is not None else gold, pred))
