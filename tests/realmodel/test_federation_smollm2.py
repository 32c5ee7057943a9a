"""SmolLM2-135M-Instruct in 4-bit NF4 through `flwr run`: 2 nodes, 2 rounds, chat prompts; the response
loss falls and the final adapter loads with PEFT and generates."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from scripts.flower_run import flwr_run, read_metrics

pytestmark = pytest.mark.realmodel

# A shape that fits the CI budget on 2 cores: short sequences, a few steps, a small held-out set.
SMALL: dict[str, Any] = {
    "model.name": "smollm2-135m",
    "num-server-rounds": 2,
    "lora.rank": 8,
    "train.local-steps": 4,
    "train.batch-size": 4,
    "train.max-seq-len": 96,
    "train.lr": 0.002,
    "task.num-train": 200,
    "task.num-eval": 8,
    "task.max-new-tokens": 6,
    "strategy.fraction-train": 1.0,
    "strategy.fraction-evaluate": 0.0,
    "strategy.min-nodes": 2,
    "strategy.round-timeout": 600.0,
}


def test_two_nodes_two_rounds_on_smollm2(tmp_path: Path, smollm2_cache: Path) -> None:
    overrides = {**SMALL, "output.dir": str(tmp_path / "out"), "output.run-name": "smollm2"}
    result = flwr_run(tmp_path / "flwr-home", overrides, num_supernodes=2, timeout=1200)
    run_dir = tmp_path / "out" / "smollm2"
    assert (run_dir / "metrics.jsonl").is_file(), result.output[-4000:]
    assert "prompt format chat; held-out metric exact" in result.output
    round0 = re.search(r"round 0 \(base \+ initial adapter\): eval_loss (\d+\.\d+)", result.output)
    assert round0, result.output[-4000:]
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["nodes_accepted"] == 2 for r in rows)
    assert rows[-1]["eval_loss"] < float(round0.group(1))  # the response loss falls
    config = json.loads((run_dir / "run_config.json").read_text())
    assert Path(config["base_model_path"]).is_relative_to(smollm2_cache)
    _adapter_generates(run_dir / "adapter")


def _adapter_generates(adapter: Path) -> None:
    """The final adapter is a standard PEFT folder: it loads on its 4-bit base and answers a chat prompt."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    nf4 = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    base = AutoModelForCausalLM.from_pretrained(base_path, quantization_config=nf4, device_map={"": "cpu"})
    model = PeftModel.from_pretrained(base, str(adapter))
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    messages = [{"role": "user", "content": "Add the two numbers.\n\n12 + 7"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
    assert str(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)).strip()
