"""How an Alpaca example becomes the text a model sees: the Alpaca template, or the model's chat template.

Both formats are described the same way, as pieces around the example's fields, so that training,
evaluation and the server's length check cut a long example in one place (tasks/batches.py):

    prompt   = head + instruction + [joiner + input] + tail
    response = response_head + output + response_end

``auto`` (``task.prompt-format``) uses the tokenizer's chat template when it has one, with instruction
and input as the user turn and the output as the assistant turn, and the Alpaca template otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pollen.config import PROMPT_FORMATS

PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n### Input:\n{input}\n### Response:\n"
PROMPT_WITHOUT_INPUT = "### Instruction:\n{instruction}\n### Response:\n"

# Placeholders rendered through a chat template and split on, to find the template's own text.
_USER_MARK = "\u27e6pollen-user\u27e7"
_ANSWER_MARK = "\u27e6pollen-answer\u27e7"


class PromptFormatError(ValueError):
    """``task.prompt-format`` cannot be used with this model's tokenizer."""


@dataclass(frozen=True)
class PromptFormat:
    """The fixed text around an example's fields (see the module docstring)."""

    name: str  # "alpaca" or "chat"
    head: str
    joiner: str  # between instruction and input, when the input is not empty
    tail_with_input: str
    tail_without_input: str
    response_head: str = ""
    response_end: str = ""  # text after the output (chat: the end-of-turn token); EOS is added apart
    add_bos: bool = True  # chat templates write their own begin-of-sequence text

    def prompt(self, example: Mapping[str, Any]) -> str:
        """The whole prompt text of ``example``; the ``input`` section is omitted when empty."""
        instruction, extra = fields(example)
        if extra:
            return self.head + instruction + self.joiner + extra + self.tail_with_input
        return self.head + instruction + self.tail_without_input

    def response(self, example: Mapping[str, Any]) -> str:
        """The target text after the prompt, without the tokenizer's end-of-sequence token."""
        return self.response_head + format_response(example) + self.response_end


ALPACA = PromptFormat(
    name="alpaca",
    head="### Instruction:\n",
    joiner="\n### Input:\n",
    tail_with_input="\n### Response:\n",
    tail_without_input="\n### Response:\n",
)


def fields(example: Mapping[str, Any]) -> tuple[str, str]:
    """(instruction, input) of an example, stripped; a missing input is empty."""
    return str(example.get("instruction", "") or "").strip(), str(example.get("input", "") or "").strip()


def format_prompt(example: Mapping[str, Any]) -> str:
    """The Alpaca prompt of ``example`` (the embedded model's format)."""
    return ALPACA.prompt(example)


def format_response(example: Mapping[str, Any]) -> str:
    """The reference answer: the example's output, stripped."""
    return str(example.get("output", "") or "").strip()


def chat_format(tokenizer: Any) -> PromptFormat:
    """The tokenizer's chat template as a :class:`PromptFormat` (user turn, then assistant turn)."""
    if not getattr(tokenizer, "chat_template", None):
        raise PromptFormatError("the tokenizer has no chat template")
    user = [{"role": "user", "content": _USER_MARK}]
    prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    both = user + [{"role": "assistant", "content": _ANSWER_MARK}]
    whole = tokenizer.apply_chat_template(both, tokenize=False)
    if prompt.count(_USER_MARK) != 1 or not whole.startswith(prompt) or whole.count(_ANSWER_MARK) != 1:
        raise PromptFormatError(
            "the tokenizer's chat template does not render a user turn followed by an assistant turn"
        )
    head, tail = prompt.split(_USER_MARK)
    response_head, response_end = whole[len(prompt) :].split(_ANSWER_MARK)
    return PromptFormat(
        name="chat",
        head=head,
        joiner="\n\n",
        tail_with_input=tail,
        tail_without_input=tail,
        response_head=response_head,
        response_end=response_end.rstrip(),  # the newline after an end-of-turn token carries no signal
        add_bos=False,
    )


def resolve_prompt_format(requested: str, tokenizer: Any) -> PromptFormat:
    """The format ``task.prompt-format`` names for this tokenizer; PromptFormatError if it cannot be used."""
    if requested not in PROMPT_FORMATS:
        raise PromptFormatError(
            f"task.prompt-format={requested!r} is not valid: expected one of {', '.join(PROMPT_FORMATS)}"
        )
    if requested == "alpaca":
        return ALPACA
    try:
        return chat_format(tokenizer)
    except PromptFormatError as exc:
        if requested == "auto":  # no usable chat template: the Alpaca template, as for a base model
            return ALPACA
        raise PromptFormatError(
            f"task.prompt-format={requested!r} cannot be used with this model: {exc}; "
            "use task.prompt-format='alpaca'"
        ) from None
