"""Build Pollen's embedded base model: a byte-level tokenizer and a tiny Llama, briefly pretrained.

The pretraining corpus teaches the synthetic skills' raw knowledge ("37+45=82", "reverse: cat -> tac")
but never the Alpaca instruction format, so (Q)LoRA instruction tuning has something real to improve.

    python scripts/build_base_model.py             # rebuild tasks/assets/tiny-llama (defaults reproduce it)
    python scripts/build_base_model.py --verify    # measure QLoRA instruction tuning on the saved model
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # so the script runs as a plain file from anywhere
    sys.path.insert(0, str(_REPO_ROOT))

# These need the path above.
from tasks.batches import sample_batches, tokenize_all  # noqa: E402
from tasks.evaluation import exact_match, response_loss  # noqa: E402
from tasks.synthetic import SKILLS, Problem, draw_problem, synthetic_splits  # noqa: E402

DEFAULT_OUT = _REPO_ROOT / "tasks" / "assets" / "tiny-llama"
DEFAULT_STEPS = 1500
DEFAULT_SEED = 0

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0..3; byte b has id 4 + b
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

SEQ_LEN = 96
BATCH_SIZE = 32
PEAK_LR = 4e-3
WARMUP_STEPS = 100

# Non-instruction renderings of each skill's facts. None mentions "### Instruction" or "Response".
FACT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": (
        "{a}+{b}={answer}",
        "{a} + {b} = {answer}",
        "{a} plus {b} is {answer}.",
        "the sum of {a} and {b} is {answer}.",
    ),
    "subtract": (
        "{a}-{b}={answer}",
        "{a} - {b} = {answer}",
        "{a} minus {b} is {answer}.",
        "the difference of {a} and {b} is {answer}.",
    ),
    "reverse": (
        "reverse: {data} -> {answer}",
        "{data} backwards is {answer}.",
        "{data} reversed is {answer}",
    ),
    "sort": ("sorted {data} -> {answer}", "{data} in order: {answer}", "sort({data}) = {answer}"),
    "lookup": (
        "{data}; {key} is {answer}",
        "in {data} the value of {key} is {answer}.",
        "{data}. so {key}={answer}",
    ),
}
GENERIC_WORDS = (
    "the a of and to in is it that for on with as was at by this from or be are we you they one two "
    "number numbers digit digits letter letters word words value key keys list sum difference order "
    "sort sorted reverse add compute find write spell first second small large low high set look up "
    "answer question count each new old time day year people way good"
).split()


# --------------------------------------------------------------------------------------------- tokenizer
def _byte_to_char() -> dict[int, str]:
    """Map every byte to a printable unicode character, the scheme `tokenizers`' ByteLevel uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def build_tokenizer() -> Any:
    """A byte-level tokenizer (260 ids, no merges): every text round-trips and no token is unknown."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({char: len(SPECIAL_TOKENS) + b for b, char in _byte_to_char().items()})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=256,
    )
    return tokenizer


# --------------------------------------------------------------------------------------------- corpus
def render_fact(problem: Problem, rng: random.Random) -> str:
    """One problem written as a plain fact line in a random non-instruction format."""
    a, b = "", ""
    if problem.skill in ("add", "subtract"):
        a, b = problem.data.replace("+", "-").split(" - ")
    template = rng.choice(FACT_TEMPLATES[problem.skill])
    return template.format(a=a, b=b, data=problem.data, answer=problem.answer, key=problem.key)


def generic_sentence(rng: random.Random) -> str:
    """A short sentence of common words, so the model also knows ordinary English spelling."""
    words = [rng.choice(GENERIC_WORDS) for _ in range(rng.randint(4, 10))]
    return " ".join(words).capitalize() + "."


def pretraining_document(rng: random.Random) -> str:
    """A few lines of mixed facts and sentences; documents are separated by EOS in the token stream."""
    lines = []
    for _ in range(rng.randint(2, 6)):
        if rng.random() < 0.1:
            lines.append(generic_sentence(rng))
        else:
            lines.append(render_fact(draw_problem(rng.choice(SKILLS), rng), rng))
    return "\n".join(lines)


def token_stream(tokenizer: Any, rng: random.Random) -> Iterator[int]:
    """Endless token ids: BOS document EOS BOS document EOS ... (Pollen prepends BOS to prompts too)."""
    while True:
        yield tokenizer.bos_token_id
        yield from tokenizer(pretraining_document(rng), add_special_tokens=False, verbose=False)["input_ids"]
        yield tokenizer.eos_token_id


def next_batch(stream: Iterator[int], batch_size: int, seq_len: int) -> torch.Tensor:
    """(batch_size, seq_len) consecutive windows of the stream."""
    flat = [next(stream) for _ in range(batch_size * seq_len)]
    return torch.tensor(flat, dtype=torch.long).view(batch_size, seq_len)


# --------------------------------------------------------------------------------------------- model
def build_model(tokenizer: Any) -> Any:
    """A ~0.9M-parameter Llama; every width is a multiple of 64 so 4-bit bitsandbytes blocks fit."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model


def learning_rate(step: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < WARMUP_STEPS:
        return PEAK_LR * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
    return PEAK_LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(model: Any, tokenizer: Any, steps: int, seed: int, log_every: int) -> float:
    """Next-token pretraining on the fact corpus; returns the mean loss of the last ``log_every`` steps."""
    stream = token_stream(tokenizer, random.Random(seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    recent: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps)
        batch = next_batch(stream, BATCH_SIZE, SEQ_LEN)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent = (recent + [loss.item()])[-log_every:]
        if (step + 1) % log_every == 0 or step + 1 == steps:
            elapsed = time.perf_counter() - start
            mean = sum(recent) / len(recent)
            print(f"step {step + 1}/{steps}  loss {mean:.4f}  {elapsed:.0f}s", flush=True)
    model.eval()
    return sum(recent) / len(recent)


def save_atomically(model: Any, tokenizer: Any, out: Path) -> None:
    """Write into a temporary sibling folder, then swap it into place: never a half-written artifact."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.chmod(0o755)  # mkdtemp makes it private; the artifact is meant to be shared
        for file in staging.iterdir():
            file.chmod(0o644)
        old = out.with_name(f".{out.name}-old")
        if old.exists():
            shutil.rmtree(old)
        if out.exists():
            out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build(out: Path, steps: int, seed: int, log_every: int = 100) -> None:
    """Build, pretrain and save the base model; same arguments, same artifact (on the same thread count)."""
    random.seed(seed)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    count = sum(p.numel() for p in model.parameters())
    print(f"tiny llama: {count:,} parameters; pretraining {steps} steps of {BATCH_SIZE}x{SEQ_LEN} tokens")
    pretrain(model, tokenizer, steps, seed, log_every)
    save_atomically(model, tokenizer, out)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"saved {out} ({size / 1e6:.2f} MB)")


# --------------------------------------------------------------------------------------------- verify
def exact_match_by_skill(model: Any, tokenizer: Any, test: Any) -> dict[str, float]:
    """Exact match of greedy answers (at most 12 new tokens), overall and per skill."""
    result, hits = {}, 0.0
    for skill in SKILLS:
        subset = test.filter(lambda row, s=skill: row["skill"] == s)
        score = exact_match(model, tokenizer, subset, max_new_tokens=12, batch_size=50)
        if score is None:
            raise ValueError(f"the test set holds no {skill!r} example")
        result[skill] = score
        hits += result[skill] * len(subset)
    return {"all": hits / len(test), **result}


def load_qlora(path: Path) -> tuple[Any, Any]:
    """The saved model in 4-bit NF4 (CPU, float32 compute) with a fresh r=8 LoRA on all 7 projections."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, device_map="cpu")
    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM"
    )
    return get_peft_model(model, lora), tokenizer


def verify(
    path: Path,
    seed: int = DEFAULT_SEED,
    steps: int = 300,
    lr: float = 3e-3,
    batch_size: int = 16,
    num_train: int = 2000,
    num_test: int = 200,
) -> dict[str, Any]:
    """QLoRA instruction tuning of the saved model with Pollen's own batching and metrics, before vs after."""
    torch.manual_seed(seed)
    model, tokenizer = load_qlora(path)
    train, test = synthetic_splits(num_train, num_test, seed)
    pad_id = tokenizer.pad_token_id
    test_rows = tokenize_all(tokenizer, test, max_seq_len=128)
    result: dict[str, Any] = {"loss_before": response_loss(model, test_rows, pad_id, batch_size=50)}
    result["exact_match_before"] = exact_match_by_skill(model, tokenizer, test)

    batches = sample_batches(
        tokenize_all(tokenizer, train, max_seq_len=128),
        batch_size,
        pad_id,
        torch.Generator().manual_seed(seed),
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    step_times = []
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20) * (1 - step / steps)  # warm-up, linear decay
        batch = next(batches)
        started = time.perf_counter()
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step_times.append(time.perf_counter() - started)
        if (step + 1) % 50 == 0:
            print(f"lora step {step + 1}/{steps}  loss {loss.item():.4f}", flush=True)
    model.eval()

    result["loss_after"] = response_loss(model, test_rows, pad_id, batch_size=50)
    result["exact_match_after"] = exact_match_by_skill(model, tokenizer, test)
    if result["loss_before"] is None or result["loss_after"] is None:
        raise ValueError("no test example carries a response token at 128 tokens")
    result["loss_drop"] = 1 - result["loss_after"] / result["loss_before"]
    result["median_step_seconds"] = sorted(step_times)[len(step_times) // 2]
    return result


# --------------------------------------------------------------------------------------------- cli
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="artifact folder (replaced atomically)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="pretraining steps")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of weights, corpus and order")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (same count, same bits)")
    parser.add_argument("--log-every", type=int, default=100, help="print the loss every N steps")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="skip building; QLoRA-tune the model at --out and print before/after metrics",
    )
    parser.add_argument("--verify-steps", type=int, default=300, help="LoRA steps for --verify")
    parser.add_argument("--verify-lr", type=float, default=3e-3, help="peak LoRA learning rate for --verify")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.verify:
        result = verify(args.out, seed=args.seed, steps=args.verify_steps, lr=args.verify_lr)
        print(json.dumps(result, indent=2))
    else:
        build(args.out, args.steps, args.seed, args.log_every)


if __name__ == "__main__":
    main()
