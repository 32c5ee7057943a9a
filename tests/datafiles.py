"""Real-shaped Alpaca files written by tests: long classification prompts, label and choice outputs."""

from __future__ import annotations

import json
import random
from pathlib import Path

LABELS = ("positive", "negative", "neutral")
_WORDS = {
    "positive": ("great", "lovely", "excellent", "friendly", "fast", "clean", "helpful", "superb"),
    "negative": ("awful", "rude", "slow", "dirty", "broken", "late", "noisy", "terrible"),
    "neutral": ("average", "ordinary", "usual", "plain", "standard", "typical", "regular", "fair"),
}
_FILLER = ("the", "room", "staff", "food", "service", "was", "and", "very", "quite", "our", "visit", "stay")
INSTRUCTION = "Classify the sentiment of this hotel review as positive, negative or neutral."


def review(label: str, rng: random.Random, words: int = 40) -> str:
    """About 250 characters of review whose sentiment words (spread throughout) give ``label``."""
    out = []
    for i in range(words):
        out.append(rng.choice(_WORDS[label]) if i % 4 == 3 else rng.choice(_FILLER))
    return " ".join(out) + "."


def label_rows(count: int, seed: int = 0, skew: float = 0.5) -> list[dict[str, str]]:
    """Sentiment examples; ``skew`` of them positive, the rest split between the other labels."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        draw = rng.random()
        label = "positive" if draw < skew else ("negative" if draw < (1 + skew) / 2 else "neutral")
        rows.append({"instruction": INSTRUCTION, "input": review(label, rng), "output": label})
    return rows


def choice_rows(count: int, seed: int = 0) -> list[dict[str, str]]:
    """Four-option questions whose answer is an option letter."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a = rng.randint(1, 20)
        options = rng.sample(range(2, 41), 4)
        answer = rng.randrange(4)
        options[answer] = a + a
        text = " ".join(f"{letter}) {value}" for letter, value in zip("ABCD", options, strict=True))
        rows.append(
            {
                "instruction": f"What is {a}+{a}? Answer with the letter.",
                "input": text,
                "output": "ABCD"[answer],
            }
        )
    return rows


def write_json(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text(json.dumps(rows))
    return path
