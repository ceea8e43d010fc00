"""Read the option letter (or yes/no) a model chose out of its free-text answer.

Two modes:

* ``strict`` accepts only explicit choices: an answer marker ("Answer: B", "The answer is (C)", "Final: A.",
  "Option C"), a leading letter with a delimiter ("B. It is a car", "(B) ...", "a) ..."), or a lone letter. The
  article "a"/"A" followed by a word is never read as option A. When the explicit choices disagree ("A. ... the
  answer is C"), or the answer lists several options, the answer is ambiguous and nothing is returned.
* ``drivebench`` reproduces the DriveBench rule, defects included, so accuracies can be compared with published
  tables: the lower-cased text is searched for ``a``, ``b``, ``c``, ``d`` as whole words, in that order, and the
  first found wins. "B. It is a car" is therefore read as A (the article), as upstream does.
"""

from __future__ import annotations

import re
from typing import Literal

ChoiceMode = Literal["strict", "drivebench"]
CHOICE_MODES: tuple[ChoiceMode, ...] = ("strict", "drivebench")

# A letter that stands for an option after an answer marker: in brackets, an upper-case letter, or a lower-case one
# that is not the article "a" in front of a word ("the answer is a car"). Case-sensitive inside the marker pattern.
_LETTER = r"(?-i:[(\[]\s*([A-Da-d])\s*[)\]]|(?<![\w'])([A-D]|[b-d]|a(?!\s+[a-z]))(?![\w']))"
_MARKER = re.compile(
    r"\b(?:(?:final|correct|right|best)\s+)?(?:answer|option|choice|final)s?\b"
    r"(?:\s+(?:is|would\s+be|should\s+be|will\s+be))?\s*[:=\-]?\s*[*_]*\s*" + _LETTER,
    re.IGNORECASE,
)
# A letter opening the answer (or a line of it) followed by a delimiter: "B.", "B)", "(B)", "B:", "[B]".
_LEADING = re.compile(r"(?m)^\s*[*_]*\s*(?:[(\[]\s*([A-Da-d])\s*[)\]]|([A-Da-d])\s*[.):](?!\w))")
# An option listed inside a sentence after another one ("A. Going ahead. B. Stopped."): echoing options.
_LISTED = re.compile(r"(?<=[.!?;]\s)([A-D])[.)]\s")
_LONE = re.compile(r"^\s*[*_(\[]*\s*([A-Da-d])\s*[*_)\].!]*\s*$")
_UPSTREAM = {letter: re.compile(rf"\b{letter}\b") for letter in "abcd"}
_YES_NO = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)
_YES_NO_MARKER = re.compile(r"\b(?:answer|final)\b\s*(?:is)?\s*[:=\-]?\s*\**\s*(yes|no)\b", re.IGNORECASE)


def _letters(matches: list[re.Match[str]]) -> set[str]:
    return {next(g for g in m.groups() if g).upper() for m in matches}


def _strict(text: str) -> str | None:
    first_line = text.strip().splitlines()[0] if text.strip() else ""
    lone = _LONE.match(first_line)
    found = _letters(
        list(_MARKER.finditer(text)) + list(_LEADING.finditer(text)) + list(_LISTED.finditer(text))
    )
    if lone:
        found.add(lone.group(1).upper())
    return found.pop() if len(found) == 1 else None


def _drivebench(text: str) -> str | None:
    lowered = text.lower()
    for letter, pattern in _UPSTREAM.items():
        if pattern.search(lowered):
            return letter.upper()
    return None


def extract_choice(text: str | None, mode: ChoiceMode = "strict") -> str | None:
    """The option letter "A".."D" chosen in ``text``, or ``None`` when there is none (or it is ambiguous)."""
    if mode not in CHOICE_MODES:
        raise ValueError(f"unknown choice mode {mode!r}; expected one of {', '.join(CHOICE_MODES)}")
    if not text or not text.strip():
        return None
    return _strict(text) if mode == "strict" else _drivebench(text)


def extract_yes_no(text: str | None) -> str | None:
    """The yes/no answer ("yes" or "no") when the text starts with it or states it after "answer" or "Final:"
    (the ``rationale_first`` layout), else None; None too when they disagree."""
    if not text:
        return None
    found = {m.group(1).lower() for m in (_YES_NO.match(text), *_YES_NO_MARKER.finditer(text)) if m}
    return found.pop() if len(found) == 1 else None
