"""Alpaca-style prompt formatting shared by training, evaluation and the embedded base model.

One template for every dataset keeps the loss mask simple: the model is trained on the response
tokens only, and exact-match evaluation generates after the prompt and compares with the output.
"""

from __future__ import annotations

from collections.abc import Mapping

PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n### Input:\n{input}\n### Response:\n"
PROMPT_WITHOUT_INPUT = "### Instruction:\n{instruction}\n### Response:\n"


def format_prompt(example: Mapping[str, str]) -> str:
    """The text the model sees before its answer; the ``input`` section is omitted when empty."""
    instruction = str(example.get("instruction", "")).strip()
    extra = str(example.get("input", "") or "").strip()
    if extra:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=extra)
    return PROMPT_WITHOUT_INPUT.format(instruction=instruction)


def format_response(example: Mapping[str, str]) -> str:
    """The target text (the tokenizer's end-of-sequence token is appended by the caller)."""
    return str(example.get("output", "")).strip()
