"""The round-cost benchmark's reference: the same training steps in one plain process, no Flower.

Plain transformers + PEFT + bitsandbytes, written the way a user trains a QLoRA adapter by hand: load
the base in 4-bit NF4, wrap it with ``get_peft_model``, AdamW, ``model(**batch).loss``. Only the
examples are prepared with Pollen's tokenizer (tasks/batches.py), so both sides train on the same
tokens. Prints one JSON line: seconds of the steps (load excluded) and the process's peak RSS.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def peak_rss_mib() -> float:
    """The kernel's high-water mark of this process's resident memory (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def plain_loop(
    model_dir: str, data_file: str, steps: int, batch_size: int, seq_len: int, rank: int, lr: float
) -> dict[str, float]:
    """Train ``steps`` QLoRA steps on the data file's first examples; time and memory."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from tasks.batches import collate, tokenize_all
    from tasks.prompts import resolve_prompt_format

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = json.loads(Path(data_file).read_text())
    prompt = resolve_prompt_format("auto", tokenizer)
    examples = tokenize_all(tokenizer, rows[: steps * batch_size], seq_len, prompt)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quantization)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(base, lora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    started = time.perf_counter()
    for step in range(steps):
        batch = collate(examples[step * batch_size : (step + 1) * batch_size], tokenizer.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {"seconds": time.perf_counter() - started, "steps": steps, "peak_rss_mb": peak_rss_mib()}


if __name__ == "__main__":
    model_dir, data_file, steps, batch, seq_len, rank, lr = sys.argv[1:8]
    figures = plain_loop(model_dir, data_file, int(steps), int(batch), int(seq_len), int(rank), float(lr))
    print(json.dumps(figures))
