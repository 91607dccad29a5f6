"""Quality flags for a generated caption (pure Python: workers flag captions, the export counts words).

Flags (docs/ARCHITECTURE.md, "Contracts"): `truncated`, `repetition`, `refusal`, `too_short`, and
`score_truncated` (a CLIP score computed on a caption cut to the text encoder's context: the new
caption or the original one; set by the scorer, workers/scoring.py). They mark, never drop:
`recap export --exclude-flags` decides.
"""

from __future__ import annotations

import re

TRUNCATED = "truncated"
REPETITION = "repetition"
REFUSAL = "refusal"
TOO_SHORT = "too_short"
SCORE_TRUNCATED = "score_truncated"
FLAGS = (TRUNCATED, REPETITION, REFUSAL, TOO_SHORT, SCORE_TRUNCATED)

MAX_LOOP_N = 8  # longest n-gram (in words) a loop is looked for with
LOOP_REPEATS = 3  # consecutive copies that make a loop
RATIO_MIN_WORDS = 12  # shorter captions are judged on loops only
MIN_DISTINCT_TRIGRAMS = 0.5  # a real caption's trigrams are nearly all distinct

_WORD = re.compile(r"[\w']+")
# Refusal wording that is damning anywhere in a caption...
_REFUSAL_ANYWHERE = re.compile(
    r"\bas an ai\b|\bi am an ai\b|\bi'm an ai\b|\blanguage model\b|\bi apologi[sz]e\b"
    r"|\bi(?: am|'m) (?:unable|not able) to\b|\bi (?:cannot|can't|can not) (?:provide|assist|help|"
    r"describe|identify|see|view|determine|generate|fulfill|comply)\b|\bsorry, but\b",
    re.IGNORECASE,
)
# ...and wording that is a refusal only when it opens a sentence ("I cannot wait" on a sign).
_REFUSAL_OPENING = re.compile(
    r"(?:^|[.!?]\s+)(?:i(?: am|'m) sorry|sorry\b|i (?:cannot|can't|can not)\b|unfortunately, i\b)",
    re.IGNORECASE,
)


def word_count(text: str) -> int:
    """Words as Recap-DataComp-1B's `re_length` / `org_length` count them (whitespace split)."""
    return len(text.split()) if text else 0


def quality_flags(text: str, finish_reason: str, min_words: int = 5) -> list[str]:
    """The flags that apply to a caption, in the order of FLAGS."""
    flags: list[str] = []
    if finish_reason == "length":
        flags.append(TRUNCATED)
    words = _words(text)
    if has_repetition(words):
        flags.append(REPETITION)
    if is_refusal(text):
        flags.append(REFUSAL)
    if word_count(text) < min_words:
        flags.append(TOO_SHORT)
    return flags


def _words(text: str) -> list[str]:
    # Case and punctuation do not break a loop: "A dog. A dog. A dog." repeats.
    return [w.lower() for w in _WORD.findall(text.replace("\u2019", "'"))]


def has_repetition(words: list[str]) -> bool:
    """A loop at the end (greedy decoding's failure mode) or few distinct trigrams."""
    return _tail_loop(words) or _low_distinct_trigrams(words)


def _tail_loop(words: list[str]) -> bool:
    for n in range(1, MAX_LOOP_N + 1):
        span = n * LOOP_REPEATS
        if span > len(words):
            break
        tail = words[-span:]
        unit = tail[:n]
        if all(tail[i] == unit[i % n] for i in range(span)):
            return True
    return False


def _low_distinct_trigrams(words: list[str]) -> bool:
    if len(words) < RATIO_MIN_WORDS:
        return False
    trigrams = list(zip(words, words[1:], words[2:], strict=False))  # shifted copies: shorter by design
    return len(set(trigrams)) / len(trigrams) < MIN_DISTINCT_TRIGRAMS


def is_refusal(text: str) -> bool:
    normal = text.replace("\u2019", "'")
    return bool(_REFUSAL_ANYWHERE.search(normal) or _REFUSAL_OPENING.search(normal[:300]))
