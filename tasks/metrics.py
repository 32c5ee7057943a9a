"""How a generated answer is scored: exact match, label accuracy or choice accuracy (``task.metric``).

Pure string functions, so every rule is testable without a model:
- ``exact``: the whole generation equals the reference (surrounding white space ignored);
- ``label``: the first label of the task's label set that the generation names equals the reference's
  label ("Positive." and "The sentiment is positive" both name ``positive``); case-insensitive;
- ``choice``: the option letter A-E the generation gives ("B", "(C)", "The answer is B", "d.") equals
  the reference's letter; case-insensitive;
- ``loss``: no generation at all, the response loss is the only figure.
``auto`` picks ``choice`` when every reference is an option letter, ``label`` when the references take a
few distinct short values, and ``exact`` otherwise.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

# The name each metric's figure has in metrics.jsonl and on the console.
FIGURE_NAMES = {"exact": "exact_match", "label": "label_accuracy", "choice": "choice_accuracy"}

MAX_LABELS = 20  # `auto`: more distinct references than this is free text, not a label set
MAX_LABEL_WORDS = 4  # `auto`: a label is a short phrase
MAX_LABEL_SHARE = 0.5  # `auto`: distinct references are at most this share of the examples
CHOICE_LETTERS = "ABCDE"

_LETTER = f"[{CHOICE_LETTERS}{CHOICE_LETTERS.lower()}]"
# A reference that is only an option letter: "B", "(b)", "C.", "D)".
_BARE_CHOICE = re.compile(rf"^\s*\(?({_LETTER})\)?\s*[.):]?\s*$")
# Where a generation states its option, tried in this order.
_CHOICE_PATTERNS = (
    re.compile(rf"\banswer\s*(?:is|:)?\s*(?:option\s*)?\(?({_LETTER})\b", re.IGNORECASE),
    re.compile(rf"\(({_LETTER})\)"),
    re.compile(rf"^\s*({_LETTER})\s*(?:[.):]|$)"),  # "B", "b.", "C) Paris"
    re.compile(rf"\boption\s*({_LETTER})\b", re.IGNORECASE),
    re.compile(rf"(?<![A-Za-z'])([{CHOICE_LETTERS}])(?![A-Za-z'])"),  # a capital letter standing alone
)


class MetricError(ValueError):
    """``task.metric`` does not fit the task's references; the message says why and what would."""


def normalise_answer(text: str) -> str:
    """Compare exact answers without surrounding white space."""
    return text.strip()


def _fold(text: str) -> str:
    """Lower case with runs of white space and surrounding punctuation removed (for label matching)."""
    return " ".join(text.lower().split()).strip(" .,:;!?\"'()[]")


def choice_letter(text: str) -> str | None:
    """The option letter ``text`` gives, upper-cased, or None when it names none."""
    for pattern in _CHOICE_PATTERNS:
        match = pattern.search(text)
        if match:
            return match.group(1).upper()
    return None


def is_choice_reference(text: str) -> bool:
    """True for a reference that is an option letter and nothing else."""
    return _BARE_CHOICE.match(text) is not None


def named_label(text: str, labels: Sequence[str]) -> str | None:
    """The label of ``labels`` that ``text`` names first (earliest; the longer label on a tie), or None."""
    folded = f" {_fold(text)} "
    best: tuple[int, int, str] | None = None
    for label in labels:
        key = _fold(label)
        if not key:
            continue
        match = re.search(rf"(?<![0-9a-z]){re.escape(key)}(?![0-9a-z])", folded)
        if match and (best is None or (match.start(), -len(key)) < (best[0], best[1])):
            best = (match.start(), -len(key), label)
    return None if best is None else best[2]


def label_set(references: Sequence[str]) -> list[str]:
    """The distinct labels of ``references``, most common first (then alphabetical)."""
    counts = Counter(_fold(r) for r in references if _fold(r))
    return [label for label, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def majority_baseline(references: Sequence[str]) -> float | None:
    """Share of ``references`` equal to their most common label: the score of always answering it."""
    labels = [_fold(r) for r in references]
    if not labels:
        return None
    return Counter(labels).most_common(1)[0][1] / len(labels)


def choose_metric(references: Sequence[str]) -> str:
    """What ``task.metric = 'auto'`` means for these reference outputs."""
    if references and all(is_choice_reference(r) for r in references):
        return "choice"
    labels = label_set(references)
    short = all(len(label.split()) <= MAX_LABEL_WORDS for label in labels)
    if 2 <= len(labels) <= MAX_LABELS and short and len(labels) <= MAX_LABEL_SHARE * len(references):
        return "label"
    return "exact"


def check_metric(metric: str, references: Sequence[str]) -> None:
    """MetricError when an explicitly chosen metric cannot score these references."""
    if metric == "choice":
        bad = [r for r in references if choice_letter(r) is None]
        if bad:
            raise MetricError(
                f"task.metric='choice' but {len(bad)} of {len(references)} held-out outputs name no option "
                f"letter {'-'.join((CHOICE_LETTERS[0], CHOICE_LETTERS[-1]))} (e.g. {bad[0][:40]!r}); "
                "use 'label', 'exact' or 'auto'"
            )
    if metric == "label" and len(label_set(references)) < 2:
        raise MetricError(
            "task.metric='label' needs at least 2 distinct held-out outputs; use 'exact' or 'auto'"
        )


def score(metric: str, generation: str, reference: str, labels: Sequence[str] = ()) -> bool:
    """Whether ``generation`` answers ``reference`` correctly under ``metric`` (exact, label, choice)."""
    if metric == "exact":
        return normalise_answer(generation) == normalise_answer(reference)
    if metric == "label":
        said = named_label(generation, labels)
        return said is not None and _fold(said) == _fold(reference)
    if metric == "choice":
        said, wanted = choice_letter(generation), choice_letter(reference)
        return said is not None and said == wanted
    raise ValueError(f"metric {metric!r} scores no generation: expected 'exact', 'label' or 'choice'")
