"""The round-cost benchmark's shape: a 3.7M-parameter Llama and a local Alpaca-style file, both
written to a folder, so the shape is the same wherever it is rebuilt.

The model has the embedded model's byte-level tokenizer (tasks/assets/tiny-llama), 4 layers of width
256, and random weights from a fixed seed: it measures cost, not what a model knows. Its plain QLoRA
loop of 20 steps at batch 16 x 256 tokens costs about what the issue's reference loop did on this
machine (16 s and 1.3 GiB here against 10 s and 1.4 GiB there). The data are instruction / input /
output rows of four text skills with outputs as long as their inputs, so most examples fill 256 tokens.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HIDDEN, LAYERS, HEADS, INTERMEDIATE = 256, 4, 8, 832
SEED = 0
_WORDS = (
    "river stone garden window winter market letter silver doctor engine harbor meadow planet signal "
    "forest candle bridge mirror orchard thunder pencil island ladder velvet lantern compass basket "
    "glacier falcon harvest cottage anchor ribbon canyon meadow quarry saddle timber violin walnut"
).split()
SKILLS = {
    "sort": "Write the following words in alphabetical order, separated by spaces.",
    "reverse": "Write the following words in reverse order, separated by spaces.",
    "upper": "Repeat the following words in capital letters.",
    "pairs": "Join each pair of neighbouring words below with a hyphen.",
}


def _answer(skill: str, words: list[str]) -> str:
    if skill == "sort":
        return " ".join(sorted(words))
    if skill == "reverse":
        return " ".join(reversed(words))
    if skill == "upper":
        return " ".join(words).upper()
    return " ".join(f"{a}-{b}" for a, b in zip(words[::2], words[1::2], strict=False))


def alpaca_rows(count: int, seed: int = SEED) -> list[dict[str, str]]:
    """``count`` rows of the four skills, 30-50 words of input each."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        skill = rng.choice(sorted(SKILLS))
        words = [rng.choice(_WORDS) for _ in range(rng.randint(30, 50))]
        rows.append({"instruction": SKILLS[skill], "input": " ".join(words), "output": _answer(skill, words)})
    return rows


def write_alpaca_file(path: Path, count: int) -> Path:
    """The rows as a JSON list (the format of the Alpaca release)."""
    path.write_text(json.dumps(alpaca_rows(count), indent=0))
    return path


def build_model(folder: Path) -> Path:
    """Save the 3.7M Llama (config, safetensors weights, the embedded byte-level tokenizer) to ``folder``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tasks.embedded import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def parameter_count(folder: Path) -> int:
    """Parameters of the saved model (tied head counted once)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    return sum(p.numel() for p in model.parameters())
