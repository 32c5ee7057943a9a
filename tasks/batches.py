"""Tokenize Alpaca examples for causal-LM training with the loss on response tokens only.

An example longer than ``train.max-seq-len`` keeps its response and loses prompt tokens: first the
start of its input, then the start of its instruction; the template's own text (section markers, chat
turn tokens) always stays. Only a response that cannot fit even so is cut, from its end, and the
prompt then keeps at least a quarter of the sequence, so no example trains on an answer without its
question. Training, evaluation and the server's length check all cut through :class:`ExampleTokenizer`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pollen.training import IGNORE_INDEX
from tasks.prompts import ALPACA, PromptFormat, fields

MIN_PROMPT_SHARE = 4  # a response that does not fit leaves the prompt 1/4 of the sequence
# Text beyond this many characters per token of max_seq_len is dropped before tokenizing (a token
# rarely spans more), so one huge example costs no more than a long one; it is cut either way.
MAX_CHARS_PER_TOKEN = 16


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens; response tokens + EOS otherwise
    prompt_length: int = 0  # tokens before the response: generation continues from here
    prompt_cut: int = 0  # prompt tokens dropped to fit train.max-seq-len
    response_cut: int = 0  # response tokens dropped (from its end) to fit train.max-seq-len

    @property
    def has_response(self) -> bool:
        """False when the response was cut away entirely (the example carries no training signal)."""
        return any(label != IGNORE_INDEX for label in self.labels)

    @property
    def prompt_ids(self) -> list[int]:
        return self.input_ids[: self.prompt_length]


class ExampleTokenizer:
    """Turns examples into :class:`TokenizedExample` for one tokenizer, prompt format and length."""

    def __init__(self, tokenizer: Any, max_seq_len: int, prompt: PromptFormat = ALPACA) -> None:
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.prompt = prompt
        bos = tokenizer.bos_token_id if prompt.add_bos else None
        self._head = ([] if bos is None else [bos]) + self._ids(prompt.head)
        self._joiner = self._ids(prompt.joiner)
        self._tail = {True: self._ids(prompt.tail_with_input), False: self._ids(prompt.tail_without_input)}

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def __call__(self, example: Mapping[str, Any]) -> TokenizedExample:
        limit = MAX_CHARS_PER_TOKEN * self.max_seq_len
        instruction_text, input_text = fields(example)
        precut = len(instruction_text) > limit or len(input_text) > limit
        instruction, extra = self._ids(instruction_text[-limit:]), self._ids(input_text[-limit:])
        joiner = self._joiner if input_text else []
        tail = self._tail[bool(input_text)]
        response_text = self.prompt.response(example)
        precut_response = len(response_text) > limit
        response = self._ids(response_text[:limit])
        eos = self.tokenizer.eos_token_id
        if eos is not None and (not response or response[-1] != eos):
            response.append(eos)

        fixed = len(self._head) + len(joiner) + len(tail)
        content = len(instruction) + len(extra)
        room = self.max_seq_len - fixed  # for instruction, input and response together
        response_room = max(0, room - min(content, self.max_seq_len // MIN_PROMPT_SHARE))
        kept_response = response if len(response) <= response_room else response[:response_room]
        content_room = max(0, min(content, room - len(kept_response)))
        drop = content - content_room  # from the start of the input, then of the instruction
        drop_input = min(drop, len(extra))
        extra = extra[drop_input:]
        instruction = instruction[drop - drop_input :]
        prompt_ids = self._head + instruction + joiner + extra + tail
        if len(prompt_ids) > self.max_seq_len:  # the template alone is longer than max_seq_len
            prompt_ids = prompt_ids[: self.max_seq_len]
        return TokenizedExample(
            input_ids=prompt_ids + kept_response,
            labels=[IGNORE_INDEX] * len(prompt_ids) + kept_response,
            prompt_length=len(prompt_ids),
            prompt_cut=drop + precut,  # at least 1 when text was dropped before tokenizing
            response_cut=len(response) - len(kept_response) + precut_response,
        )


def tokenize_example(
    tokenizer: Any, example: Mapping[str, Any], max_seq_len: int, prompt: PromptFormat = ALPACA
) -> TokenizedExample:
    """One example, prompt positions masked, cut to ``max_seq_len`` as the module docstring says."""
    return ExampleTokenizer(tokenizer, max_seq_len, prompt)(example)


def tokenize_all(
    tokenizer: Any, dataset: Iterable[Mapping[str, Any]], max_seq_len: int, prompt: PromptFormat = ALPACA
) -> list[TokenizedExample]:
    """Tokenize every example; one whose response is cut away entirely is dropped (no signal)."""
    tokenize = ExampleTokenizer(tokenizer, max_seq_len, prompt)
    return [example for example in map(tokenize, dataset) if example.has_response]


def collate(examples: Sequence[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded positions get attention 0 and label IGNORE_INDEX."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (batch, seq)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_prompts(examples: Sequence[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad the prompts of a batch for generation (every row then continues at the right edge)."""
    width = max(e.prompt_length for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (batch, prompt)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = example.prompt_length
        ids[row, width - n :] = torch.tensor(example.prompt_ids)
        mask[row, width - n :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def sample_batches(
    examples: Sequence[TokenizedExample], batch_size: int, pad_id: int, generator: torch.Generator
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches (reshuffled every epoch), so `local-steps` is independent of data size."""
    if not examples:
        raise ValueError("no trainable examples: every example's response was cut by train.max-seq-len")
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            chunk = [examples[i] for i in order[start : start + batch_size]]
            if len(chunk) < batch_size and len(examples) >= batch_size:
                break  # keep batches full-sized when the data allows
            yield collate(chunk, pad_id)
