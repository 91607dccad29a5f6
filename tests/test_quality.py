"""Quality flags on crafted captions."""

from __future__ import annotations

import pytest

from recap.quality import FLAGS, quality_flags, word_count

GOOD = (
    "A golden retriever sits on green grass in a sunny park, holding a red ball in its mouth, "
    "while two children play on a wooden bench in the background under tall oak trees."
)


def test_a_good_caption_has_no_flags():
    assert quality_flags(GOOD, "stop") == []


def test_word_count_splits_on_whitespace():
    assert word_count("a  dog\non grass ") == 4
    assert word_count("") == 0


def test_truncated_when_the_length_limit_ended_it():
    assert quality_flags(GOOD, "length") == ["truncated"]


@pytest.mark.parametrize(
    "text",
    [
        "A photo of a dog on the grass grass grass",
        "A man in a suit. A man in a suit. A man in a suit.",
        (
            "The image shows a large city with tall buildings, cars on the street and people walking "
            "on the sidewalk, with a clear blue sky above the city and the city and the city and"
        ),
        # a loop of eight words, three times
        "intro " + " ".join(["a red car parked next to a tree"] * 3),
    ],
)
def test_repetition_loops_are_flagged(text):
    assert "repetition" in quality_flags(text, "stop")


def test_low_distinct_trigram_ratio_is_repetition_even_without_a_tail_loop():
    text = "a cat on a mat and " * 5 + "then a dog runs across the lawn"
    assert "repetition" in quality_flags(text, "stop")


def test_natural_reuse_of_words_is_not_repetition():
    text = (
        "A red car and a blue car are parked on the street. The red car is in front of "
        "the blue car, and a man walks past the cars."
    )
    assert "repetition" not in quality_flags(text, "stop")


@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry, but I cannot provide a description of this image.",
        "I\u2019m sorry, I can\u2019t help with that.",
        "As an AI language model, I do not see images.",
        "I cannot determine what is shown in this picture because it is blurry.",
        "The picture is dark. Unfortunately, I am unable to describe it in more detail.",
    ],
)
def test_refusals_are_flagged(text):
    assert "refusal" in quality_flags(text, "stop")


def test_refusal_words_inside_a_real_caption_are_not_a_refusal():
    text = "A protest sign that reads 'I cannot wait for summer' held by a smiling woman in a park."
    assert "refusal" not in quality_flags(text, "stop")


def test_too_short_under_min_words():
    assert quality_flags("A dog.", "stop") == ["too_short"]
    assert quality_flags("A dog on grass.", "stop", min_words=3) == []
    assert "too_short" in quality_flags("", "error")


def test_flags_come_in_a_stable_order():
    flags = quality_flags("sorry sorry sorry", "length")
    assert flags == [f for f in FLAGS if f in flags]
    assert flags == ["truncated", "repetition", "refusal", "too_short"]
