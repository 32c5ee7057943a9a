"""Prompt formats (Alpaca, the tokenizer's chat template) and truncation that keeps the response."""

from __future__ import annotations

from typing import Any

import pytest

from pollen.model import load_tokenizer
from tasks.batches import IGNORE_INDEX, ExampleTokenizer, tokenize_example
from tasks.embedded import embedded_model_dir
from tasks.evaluation import stop_token_ids
from tasks.prompts import ALPACA, PromptFormatError, format_prompt, resolve_prompt_format

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
EXAMPLE = {
    "instruction": "Classify the review.",
    "input": "the room was " + "very " * 30 + "clean",
    "output": "positive",
}


@pytest.fixture
def tokenizer() -> Any:
    return load_tokenizer(str(embedded_model_dir()))


def _text(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)


def test_an_example_that_fits_is_prompt_then_response(tokenizer: Any) -> None:
    example = tokenize_example(tokenizer, EXAMPLE, 512)
    assert example.prompt_cut == example.response_cut == 0
    assert _text(tokenizer, example.prompt_ids) == tokenizer.bos_token + format_prompt(EXAMPLE)
    response = [t for t in example.labels if t != IGNORE_INDEX]
    assert _text(tokenizer, response) == "positive" + tokenizer.eos_token


def test_a_long_example_loses_the_start_of_its_input_and_keeps_its_response(tokenizer: Any) -> None:
    full = tokenize_example(tokenizer, EXAMPLE, 512)
    cut = tokenize_example(tokenizer, EXAMPLE, 100)
    assert len(cut.input_ids) == 100 and cut.prompt_cut == len(full.input_ids) - 100
    assert cut.labels[cut.prompt_length :] == full.labels[full.prompt_length :]  # the whole response
    prompt = _text(tokenizer, cut.prompt_ids)
    assert prompt.startswith(tokenizer.bos_token + "### Instruction:\nClassify the review.\n### Input:\n")
    assert prompt.endswith("very clean\n### Response:\n") and "the room" not in prompt


def test_a_response_longer_than_the_sequence_keeps_its_start_and_a_quarter_for_the_prompt(
    tokenizer: Any,
) -> None:
    long_answer = {**EXAMPLE, "output": "x" * 300}
    cut = tokenize_example(tokenizer, long_answer, 128)
    assert len(cut.input_ids) == 128 and cut.response_cut > 0 and cut.has_response
    assert cut.prompt_length >= 128 // 4
    assert set(_text(tokenizer, cut.input_ids[cut.prompt_length :])) == {"x"}


def test_auto_uses_alpaca_without_a_chat_template_and_chat_refuses(tokenizer: Any) -> None:
    assert resolve_prompt_format("auto", tokenizer) is ALPACA
    with pytest.raises(PromptFormatError, match="task.prompt-format='chat' cannot be used with this model"):
        resolve_prompt_format("chat", tokenizer)


def test_chat_format_follows_the_tokenizer_template(tokenizer: Any) -> None:
    tokenizer.chat_template = CHATML
    chat = resolve_prompt_format("auto", tokenizer)
    assert chat.name == "chat" and resolve_prompt_format("alpaca", tokenizer) is ALPACA
    user = EXAMPLE["instruction"] + "\n\n" + EXAMPLE["input"]
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )
    assert chat.prompt(EXAMPLE) == expected
    assert chat.response(EXAMPLE) == "positive<|im_end|>"
    example = ExampleTokenizer(tokenizer, 512, chat)(EXAMPLE)
    assert _text(tokenizer, example.prompt_ids) == expected  # no extra BOS: the template owns the start
    assert _text(tokenizer, [t for t in example.labels if t != IGNORE_INDEX]) == (
        "positive<|im_end|>" + tokenizer.eos_token
    )
    assert stop_token_ids(tokenizer, chat) == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(">")]


def test_a_huge_example_is_cut_before_it_is_tokenized(tokenizer: Any) -> None:
    from tasks.batches import MAX_CHARS_PER_TOKEN

    seen: list[int] = []

    class Spy:
        """The tokenizer, recording the length of every text it is asked to tokenize."""

        def __getattr__(self, name: str) -> Any:
            return getattr(tokenizer, name)

        def __call__(self, text: str, **kwargs: Any) -> Any:
            seen.append(len(text))
            return tokenizer(text, **kwargs)

    huge = {**EXAMPLE, "input": "word " * 2_000_000}  # 10 MB of input
    cut = tokenize_example(Spy(), huge, 128)
    assert max(seen) <= MAX_CHARS_PER_TOKEN * 128  # never the whole 10 MB
    assert len(cut.input_ids) == 128 and cut.prompt_cut > 0 and cut.response_cut == 0
    assert _text(tokenizer, [t for t in cut.labels if t != IGNORE_INDEX]) == "positive" + tokenizer.eos_token
