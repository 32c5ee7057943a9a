"""The synthetic instruction dataset and the committed tiny base model it is learned with."""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

from tasks.prompts import format_prompt, format_response
from tasks.synthetic import SKILLS, make_examples, synthetic_splits

ASSET = Path(__file__).resolve().parents[2] / "tasks" / "assets" / "tiny-llama"
MAX_FORMATTED_CHARS = 96


def expected_answer(example: dict[str, str]) -> str:
    """Each skill's answer recomputed from the prompt text alone, independently of the generator."""
    skill, data = example["skill"], example["input"]
    if skill == "add":
        left, right = (int(x) for x in data.split("+"))
        return str(left + right)
    if skill == "subtract":
        left, right = (int(x) for x in data.split("-"))
        return str(left - right)
    if skill == "reverse":
        return "".join(reversed(data))
    if skill == "sort":
        return " ".join(sorted(data.split(), key=int))
    if skill == "lookup":
        table = dict(re.findall(r"(\w+)=(\w+)", data))
        asked = [k for k in table if re.search(rf"\b{k}\b", example["instruction"])]
        assert len(asked) == 1, example
        return table[asked[0]]
    raise AssertionError(f"unexpected skill {skill}")


def test_same_seed_same_examples_and_other_seed_others() -> None:
    assert make_examples(50, seed=3) == make_examples(50, seed=3)
    assert make_examples(50, seed=3) != make_examples(50, seed=4)
    train_a, test_a = synthetic_splits(40, 20, seed=1)
    train_b, test_b = synthetic_splits(40, 20, seed=1)
    assert train_a.to_list() == train_b.to_list() and test_a.to_list() == test_b.to_list()
    assert synthetic_splits(40, 20, seed=2)[0].to_list() != train_a.to_list()


def test_skills_are_balanced() -> None:
    counts = Counter(e["skill"] for e in make_examples(103, seed=0))
    assert set(counts) == set(SKILLS) and len(SKILLS) >= 4
    assert max(counts.values()) - min(counts.values()) <= 1
    two_skills = make_examples(10, seed=0, skills=["sort", "add"])
    assert Counter(e["skill"] for e in two_skills) == {"sort": 5, "add": 5}


def test_every_answer_is_correct() -> None:
    for example in make_examples(1000, seed=7):
        assert example["output"] == expected_answer(example), example


def test_instructions_vary_within_a_skill() -> None:
    examples = make_examples(300, seed=0)
    for skill in SKILLS:
        wordings = {re.sub(r"\b[a-z]\b", "_", e["instruction"]) for e in examples if e["skill"] == skill}
        assert len(wordings) >= 2, skill


def test_train_and_test_share_no_prompt() -> None:
    train, test = synthetic_splits(2000, 200, seed=5)
    assert len(train) == 2000 and len(test) == 200
    assert train.column_names == test.column_names == ["instruction", "input", "output", "skill"]
    test_prompts = {format_prompt(e) for e in test}
    assert len(test_prompts) == len(test)  # test problems are distinct
    assert not test_prompts & {format_prompt(e) for e in train}


def test_formatted_examples_are_short() -> None:
    for example in make_examples(2000, seed=11):
        text = format_prompt(example) + format_response(example)
        assert len(text) <= MAX_FORMATTED_CHARS, text
        assert 1 <= len(example["output"]) <= 9


def test_bad_arguments_are_reported() -> None:
    with pytest.raises(ValueError, match="skills"):
        make_examples(3, seed=0, skills=["juggle"])
    with pytest.raises(ValueError, match=">= 0"):
        make_examples(-1, seed=0)


def test_committed_tokenizer_round_trips_printable_ascii() -> None:
    tokenizer = AutoTokenizer.from_pretrained(ASSET)
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    texts = [string.printable, "### Instruction:\nReverse it.\n### Response:\n", "  two  spaces\n\n", "a\tb"]
    for text in texts:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert len(tokenizer) <= 512


def test_committed_model_is_a_tiny_llama() -> None:
    config = json.loads((ASSET / "config.json").read_text())
    assert config["model_type"] == "llama"
    model = AutoModelForCausalLM.from_pretrained(ASSET)
    assert isinstance(model, LlamaForCausalLM)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= names
    assert 500_000 <= sum(p.numel() for p in model.parameters()) <= 1_500_000
    assert config["hidden_size"] % 64 == 0 and config["intermediate_size"] % 64 == 0
    assert model.generation_config.eos_token_id == config["eos_token_id"]
    assert sum(f.stat().st_size for f in ASSET.iterdir()) < 4_000_000
