"""Node memory of one QLoRA training step on SmolLM2-135M: where it goes, and what cuts it.

Usage: python benchmarks/node_memory.py [--steps 6] [--batch-size 8] [--seq-len 160]

Shape: SmolLM2-135M-Instruct in 4-bit NF4 on the CPU, rank-8 LoRA on every linear layer, AdamW,
batches of synthetic-task examples in the model's chat format, each prompt filled with earlier
examples as context and cut to exactly ``--seq-len`` tokens (the response stays whole). Every setting
runs in a fresh subprocess, so each peak is that setting's own:
- before: the loss the old way, ``model(**batch).loss`` with labels (logits at every position), and
  the old load (the checkpoint file stays mapped);
- response-only logits: ``pollen.training.train_steps`` (logits only where a response token is
  predicted), old load; then the same with gradient checkpointing on the 4-bit base;
- the same two with the checkpoint file released after loading (``release_checkpoint_file``); again
  with glibc's mmap threshold fixed at 64 KiB for good (``compact_heap``: the load as shipped with
  gradient checkpointing); and with the threshold fixed during the load only (``reuse_heap_after_load``:
  the load as shipped without it); then that with micro-batches of 2 rows (train.micro-batch-size).
One more subprocess measures evaluation alone, and one loads the base unquantized (float32
footprint). Peaks are the kernel's high-water mark of resident memory (VmHWM), reset with
/proc/self/clear_refs before each phase.
Writes the "node-memory" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.report import load_average, machine_line, write_section  # noqa: E402
from server_app.evaluation import EVAL_BATCH_SIZE  # noqa: E402

MODEL = "smollm2-135m"
RANK = 8
LR = 3e-3


@dataclass(frozen=True)
class Setting:
    """One measured configuration of the node: which loss, checkpointing or not, which load."""

    name: str
    full_logits: bool  # True: the old loss, model(**batch).loss (logits at every position)
    checkpointing: bool  # gradient checkpointing on the 4-bit base (train.gradient-checkpointing)
    load: str  # "old": file kept mapped, glibc heap as is; "released": file released only; "fixed": and
    # the 64 KiB mmap threshold kept after the load; "reused": that threshold during the load only
    micro_batch: int = 0  # train.micro-batch-size (0 = the whole batch in one pass)


SETTINGS = (
    Setting("before: full logits", True, False, "old"),
    Setting("response-only logits", False, False, "old"),
    Setting("response-only + checkpointing", False, True, "old"),
    Setting("response-only, file released", False, False, "released"),
    Setting("response-only + checkpointing, file released", False, True, "released"),
    Setting("response-only, 64 KiB threshold kept", False, False, "fixed"),
    Setting("response-only + checkpointing, 64 KiB threshold kept (shipped)", False, True, "fixed"),
    Setting("response-only, heap reused after the load (shipped)", False, False, "reused"),
    Setting("response-only + checkpointing, heap reused after the load", False, True, "reused"),
    Setting("response-only, heap reused, micro-batches of 2", False, False, "reused", micro_batch=2),
)
SHIPPED = SETTINGS[7].name  # pollen as shipped with train.gradient-checkpointing=false
EVAL = "evaluation only"
MIB = 1024 * 1024


# ---- memory readings (Linux) ----------------------------------------------------------------------
def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB -> MiB
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_mib() -> float:
    """Resident memory now."""
    return _status_mib("VmRSS")


def peak_mib() -> float:
    """Resident high-water mark since the last :func:`reset_peak` (or the process start)."""
    return _status_mib("VmHWM")


def reset_peak() -> None:
    """Reset the high-water mark to the current resident memory (Linux clear_refs value 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def lifetime_peak_mib() -> float:
    """``ru_maxrss``: the process's peak, since the last :func:`reset_peak` (clear_refs resets it too)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- the batches ------------------------------------------------------------------------------------
def filled_examples(tokenizer: Any, count: int, seq_len: int, seed: int) -> list[Any]:
    """``count`` synthetic examples in the chat format, each exactly ``seq_len`` tokens long.

    Each example's input is preceded by earlier solved examples as context, more than fits; the
    tokenizer then cuts the start of that input, so every row is full and keeps its whole response.
    """
    from client_app.worker import example_tokenizer
    from tasks.synthetic import make_examples

    pool = make_examples(count * 40, seed)
    tokenize = example_tokenizer(tokenizer, seq_len, "auto")  # as a node tokenizes (task.prompt-format)
    out = []
    for i in range(count):
        target = pool[i]
        context = "\n".join(
            f"{e['instruction']} {e['input']} -> {e['output']}" for e in pool[count + 30 * i :][:30]
        )
        example = {**target, "input": f"Solved examples:\n{context}\nNow: {target['input']}"}
        tokenized = tokenize(example)
        if len(tokenized.input_ids) != seq_len or tokenized.response_cut:
            raise RuntimeError(
                f"example {i} has {len(tokenized.input_ids)} tokens, not {seq_len}; add context"
            )
        out.append(tokenized)
    return out


# ---- one setting, in this process --------------------------------------------------------------------
def _timed(batches: list[dict[str, Any]], stamps: list[float]) -> Iterator[dict[str, Any]]:
    """Yield the batches in turn, noting when each step asks for its batch (step boundaries)."""
    for batch in batches:
        stamps.append(time.perf_counter())
        yield batch


def _train_full_logits(
    model: Any, parameters: list[Any], batches: Iterator[dict[str, Any]], steps: int
) -> list[float]:
    """The reference: the loop of pollen.training.train_steps with the old loss, HF's own with labels."""
    import torch

    optimizer = torch.optim.AdamW(parameters, lr=LR, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        batch = next(batches)
        loss = model(**batch).loss  # logits (batch, seq, vocab) at every position, mean over response tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def _load_as_before(path: str) -> Any:
    """The reference load: pollen.model.load_base_model before release_checkpoint_file existed."""
    import torch
    from transformers import AutoModelForCausalLM

    from pollen.device import quantization_config
    from pollen.model import keep_4bit_layers_trainable

    quant = quantization_config("4bit", torch.float32)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=quant, device_map={"": "cpu"}
    )
    keep_4bit_layers_trainable(model)
    model.requires_grad_(False)
    model.eval()
    return model


def measure_eval(batch_size: int, seq_len: int, seed: int) -> dict[str, Any]:
    """Evaluation alone (as the server runs it): loss and greedy answers for one batch of EVAL_BATCH_SIZE."""
    import torch

    from pollen.config import LoraConfig, ModelConfig
    from pollen.model import LoraHost, load_base_model, load_tokenizer
    from tasks.embedded import resolve_model_name
    from tasks.evaluation import generate_answers, response_loss
    from tasks.prompts import resolve_prompt_format

    torch.manual_seed(seed)
    path = resolve_model_name(MODEL)
    tokenizer = load_tokenizer(path)
    examples = filled_examples(tokenizer, EVAL_BATCH_SIZE, seq_len, seed)
    base = load_base_model(path, ModelConfig(path, "4bit", "cpu", "auto"))
    host = LoraHost(base, LoraConfig(RANK, 16.0, 0.05, ("all-linear",)), seed=seed)
    host.activate(RANK)
    figures: dict[str, Any] = {"setting": EVAL, "rss_loaded": rss_mib()}
    reset_peak()
    response_loss(host.model, examples, tokenizer.pad_token_id, EVAL_BATCH_SIZE)
    figures["loss_peak"] = peak_mib()
    figures["rss_after_loss"] = rss_mib()
    reset_peak()
    prompt = resolve_prompt_format("auto", tokenizer)
    generate_answers(host.model, tokenizer, examples, 12, EVAL_BATCH_SIZE, prompt)
    figures["generate_peak"] = peak_mib()
    figures["rss_after_generate"] = rss_mib()
    return figures


def measure(setting: Setting, steps: int, batch_size: int, seq_len: int, seed: int) -> dict[str, Any]:
    """Load, adapt and train ``steps`` steps in this process; memory at every phase."""
    import torch

    from pollen.config import LoraConfig, ModelConfig
    from pollen.model import LoraHost, load_base_model, load_tokenizer
    from pollen.training import train_steps
    from tasks.batches import collate
    from tasks.embedded import resolve_model_name

    torch.manual_seed(seed)
    path = resolve_model_name(MODEL)
    tokenizer = load_tokenizer(path)
    examples = filled_examples(tokenizer, batch_size * steps, seq_len, seed)
    batches = [
        collate(examples[i : i + batch_size], tokenizer.pad_token_id)
        for i in range(0, len(examples), batch_size)
    ]
    figures: dict[str, Any] = {"setting": setting.name, "rss_imports": rss_mib()}
    reset_peak()
    if setting.load == "released":  # the shipped load without the fixed mmap threshold
        import pollen.model

        pollen.model.return_large_blocks_to_os = lambda: None  # load_base_model's own reference
    if setting.load == "old":
        base = _load_as_before(path)
    else:
        compact = setting.load == "fixed"  # the 64 KiB threshold kept after the load
        base = load_base_model(path, ModelConfig(path, "4bit", "cpu", "auto"), compact_heap=compact)
    figures["load_peak"], figures["rss_loaded"] = peak_mib(), rss_mib()
    figures["footprint_nf4"] = base.get_memory_footprint() / MIB
    host = LoraHost(
        base,
        LoraConfig(RANK, 16.0, 0.05, ("all-linear",)),
        seed=seed,
        gradient_checkpointing=setting.checkpointing,
    )
    host.activate(RANK)
    parameters = host.trainable_parameters()
    figures["lora_parameters"] = sum(p.numel() for p in parameters)
    figures["rss_before_train"] = rss_mib()
    stamps: list[float] = []
    reset_peak()
    if setting.full_logits:
        losses = _train_full_logits(host.model, parameters, _timed(batches, stamps), steps)
    else:
        result = train_steps(
            host.model,
            parameters,
            _timed(batches, stamps),
            steps,
            LR,
            torch.device("cpu"),
            setting.micro_batch,
        )
        losses = [result.mean_loss]  # train_steps reports the mean only
    stamps.append(time.perf_counter())
    figures["train_peak"], figures["rss_after_train"] = peak_mib(), rss_mib()
    step_seconds = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    figures["step_seconds"] = step_seconds
    figures["mean_loss"] = statistics.fmean(losses)
    figures["lifetime_peak"] = lifetime_peak_mib()  # since the last reset_peak: clear_refs resets it too
    return figures


def measure_fp32(seed: int) -> dict[str, Any]:
    """The unquantized base: its footprint and what loading it costs."""
    from pollen.config import ModelConfig
    from pollen.model import load_base_model
    from tasks.embedded import resolve_model_name

    path = resolve_model_name(MODEL)
    start = rss_mib()
    reset_peak()
    base: Any = load_base_model(path, ModelConfig(path, "none", "cpu", "float32"))
    return {
        "setting": "fp32-load",
        "rss_imports": start,
        "rss_loaded": rss_mib(),
        "load_peak": peak_mib(),
        "footprint_fp32": base.get_memory_footprint() / MIB,
        "parameters": sum(p.numel() for p in base.parameters()),
        "vocab": int(base.config.vocab_size),
    }


# ---- the table -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    steps: int
    batch_size: int
    seq_len: int
    seed: int


def run_child(child: str, shape: Shape) -> dict[str, Any]:
    """One measurement in a fresh interpreter; its figures as JSON on the last line of stdout."""
    command = [
        sys.executable,
        __file__,
        "--child",
        child,
        "--steps",
        str(shape.steps),
        "--batch-size",
        str(shape.batch_size),
        "--seq-len",
        str(shape.seq_len),
        "--seed",
        str(shape.seed),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{child} failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _above(r: dict[str, Any]) -> float:
    return float(r["train_peak"] - r["rss_before_train"])


def render(
    command: str,
    load: float | None,
    shape: Shape,
    rows: dict[str, dict[str, Any]],
    fp32: dict[str, Any],
    evaluation: dict[str, Any],
    minutes: float,
) -> str:
    """The section: what was run, the settings table, and where the memory goes."""
    first = rows[SETTINGS[0].name]
    logits_mib = shape.batch_size * shape.seq_len * fp32["vocab"] * 4 / MIB
    lines = [
        "## Node memory: one QLoRA node on SmolLM2-135M",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_line(load)}; {minutes:.1f} min in all.",
        "",
        f"SmolLM2-135M-Instruct ({fp32['parameters'] / 1e6:.1f} M parameters, vocabulary {fp32['vocab']}) "
        "in 4-bit "
        f"NF4 on the CPU, rank-{RANK} LoRA on all linear layers ({first['lora_parameters'] / 1e6:.2f} M "
        f"parameters), AdamW lr {LR}, batch {shape.batch_size} x {shape.seq_len} tokens (synthetic-task "
        f"examples in the chat format, each prompt filled with solved examples as context and cut to "
        f"{shape.seq_len} tokens, answers whole), {shape.steps} steps on the same batches in every setting. "
        "Each setting ran in a fresh process. *Process peak* is the largest resident memory of the process "
        "(loading or training; what a node reports as `client_peak_rss_mb`); *loaded* is the resident "
        "memory with the model loaded and the adapter made; "
        "*training above loaded* is the resident high-water mark during the steps minus *loaded*. "
        "*Old load* is `pollen.model.load_base_model` as it was (the checkpoint file stays mapped, glibc's "
        "heap as it comes); *file released* adds `release_checkpoint_file`; *64 KiB threshold kept* also "
        "fixes glibc's mmap threshold at 64 KiB for good (`load_base_model(compact_heap=True)`, as a node "
        "with train.gradient-checkpointing loads); *heap reused* fixes it during the load only and lets the "
        "steps reuse heap blocks up to 32 MiB (`reuse_heap_after_load`), as a node without checkpointing "
        "loads. Rows marked *(shipped)* are what a node does with and without checkpointing. "
        "*Micro-batches of 2* runs "
        "each step's 8 rows 2 at a time (train.micro-batch-size=2). The step time is the median over the "
        "steps; the loss is the same in every row (same batches, same seeds) but the micro-batched one, "
        "whose LoRA dropout masks are drawn per micro-batch.",
        "",
        "| setting | process peak MiB | loaded MiB | training above loaded MiB | s per step "
        "| mean training loss |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for setting in SETTINGS:
        r = rows[setting.name]
        lines.append(
            f"| {setting.name} | {max(r['lifetime_peak'], r['load_peak']):.0f} | {r['rss_before_train']:.0f} "
            f"| {_above(r):.0f} "
            f"| {statistics.median(r['step_seconds']):.2f} | {r['mean_loss']:.4f} |"
        )
    old, released, shipped = rows[SETTINGS[1].name], rows[SETTINGS[3].name], rows[SHIPPED]
    old_ckpt, released_ckpt, reused_ckpt = (rows[SETTINGS[i].name] for i in (2, 4, 8))
    fixed, fixed_ckpt, micro = (rows[SETTINGS[i].name] for i in (5, 6, 9))

    def loaded(r: dict[str, Any]) -> str:
        return f"{r['rss_loaded'] - r['rss_imports']:.0f}"

    lines += [
        "",
        "Where the memory goes:",
        "",
        "| part | MiB |",
        "|---|---:|",
        f"| interpreter, torch, transformers, tokenizer, batches | {shipped['rss_imports']:.0f} |",
        f"| base footprint, 4-bit NF4 (`get_memory_footprint()`) | {shipped['footprint_nf4']:.0f} |",
        f"| base footprint, float32 (`get_memory_footprint()`) | {fp32['footprint_fp32']:.0f} |",
        f"| 4-bit base resident after loading: old load / file released / as shipped "
        f"| {loaded(old)} / {loaded(released)} / {loaded(shipped)} |",
        "| peak while loading, above the imports: old / shipped "
        f"| {old['load_peak'] - old['rss_imports']:.0f} "
        f"/ {shipped['load_peak'] - shipped['rss_imports']:.0f} |",
        f"| adapter and PEFT wrapping | {shipped['rss_before_train'] - shipped['rss_loaded']:.0f} |",
        f"| one float32 logits tensor over the full vocabulary, {shape.batch_size} x {shape.seq_len} x "
        f"{fp32['vocab']} (computed) | {logits_mib:.0f} |",
        "| training: full logits minus response-only logits, old load (measured) "
        f"| {_above(first) - _above(old):.0f} |",
        "| training: what checkpointing saves, old load / as shipped (measured) "
        f"| {_above(old) - _above(old_ckpt):.0f} / {_above(shipped) - _above(fixed_ckpt):.0f} |",
        "| training: glibc heap growth a 64 KiB threshold kept after the load removes, without / with "
        f"checkpointing | {_above(released) - _above(fixed):.0f} "
        f"/ {_above(released_ckpt) - _above(fixed_ckpt):.0f} |",
        "| training: what reusing the heap after the load costs against the 64 KiB threshold kept, without "
        f"/ with checkpointing | {_above(shipped) - _above(fixed):.0f} "
        f"/ {_above(reused_ckpt) - _above(fixed_ckpt):.0f} |",
        f"| training: what micro-batches of 2 save, heap reused | {_above(shipped) - _above(micro):.0f} |",
        f"| evaluation, response loss of {EVAL_BATCH_SIZE} examples in one batch "
        "(the server's `EVAL_BATCH_SIZE`), heap reused, above loaded "
        f"| {evaluation['loss_peak'] - evaluation['rss_loaded']:.0f} |",
        f"| evaluation, greedy answers (12 new tokens) for {EVAL_BATCH_SIZE} prompts in one batch, "
        f"above loaded | {evaluation['generate_peak'] - evaluation['rss_loaded']:.0f} |",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = Shape(args.steps, args.batch_size, args.seq_len, args.seed)
    by_name = {s.name: s for s in SETTINGS}
    if args.child:
        if args.child == "fp32-load":
            figures = measure_fp32(args.seed)
        elif args.child == EVAL:
            figures = measure_eval(args.batch_size, args.seq_len, args.seed)
        else:
            figures = measure(by_name[args.child], args.steps, args.batch_size, args.seq_len, args.seed)
        print(json.dumps(figures))
        return 0
    load, started = load_average(), time.monotonic()
    rows = {}
    for setting in SETTINGS:
        print(f"measuring {setting.name} ...", flush=True)
        rows[setting.name] = run_child(setting.name, shape)
        print(f"  {json.dumps(rows[setting.name])}", flush=True)
    print("measuring evaluation and the float32 footprint ...", flush=True)
    evaluation = run_child(EVAL, shape)
    fp32 = run_child("fp32-load", shape)
    print(f"  {json.dumps(evaluation)}\n  {json.dumps(fp32)}", flush=True)
    command = "python benchmarks/node_memory.py"
    for flag, value, default in (
        ("--steps", args.steps, 6),
        ("--batch-size", args.batch_size, 8),
        ("--seq-len", args.seq_len, 160),
        ("--seed", args.seed, 0),
    ):
        if value != default:
            command += f" {flag} {value}"
    text = render(command, load, shape, rows, fp32, evaluation, (time.monotonic() - started) / 60)
    write_section("node-memory", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
