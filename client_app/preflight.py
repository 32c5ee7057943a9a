"""`pollen-check`: what an institution runs before its SuperNode joins a federation.

It reports the device and its memory, whether 4-bit bitsandbytes works here, whether the base model
loads (and its fingerprint, which must equal the server's), what the node's data file holds, and the
largest LoRA rank and batch size that fit, measured by real forward+backward steps on this device.
Exit code 0 means the node can join; otherwise the last line says why not.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pollen.config import QUANTIZATIONS, LoraConfig, ModelConfig

DEFAULT_TARGETS = "all-linear"  # the run config's lora.target-modules default (pollen.targets.ALL_LINEAR)
GB = 1024**3


def _size(nbytes: float) -> str:
    """Bytes as GB, or MB below 0.1 GB (tiny models)."""
    return f"{nbytes / GB:.2f} GB" if nbytes >= 0.1 * GB else f"{nbytes / 1024**2:.1f} MB"


class Unusable(RuntimeError):
    """This node cannot take part as configured; the message is the one-line reason."""


@dataclass
class Report:
    """What the check found, in the order it is printed."""

    lines: list[tuple[str, str]] = field(default_factory=list)
    max_rank: int | None = None
    max_batch: int | None = None
    fingerprint: str = ""

    def add(self, topic: str, text: str) -> None:
        self.lines.append((topic, text))

    def render(self) -> str:
        width = max((len(topic) for topic, _ in self.lines), default=0)
        return "\n".join(f"{topic:<{width}}  {text}" for topic, text in self.lines)


# ---- memory -------------------------------------------------------------------------------------
def ram_bytes() -> tuple[int, int]:
    """(total, available) system RAM in bytes."""
    import psutil

    memory = psutil.virtual_memory()
    return int(memory.total), int(memory.available)


def process_rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


class PeakMemory:
    """Peak memory of the code run inside ``with``: CUDA allocator peak, or sampled process RSS on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak = process_rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, process_rss())

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak = max(self.peak, process_rss())


def default_budget(device: torch.device) -> int:
    """Bytes a training step may use: 90% of the GPU's memory, or what this process holds plus 80%
    of the RAM still available on CPU."""
    if device.type == "cuda":
        _, total = torch.cuda.mem_get_info(device)
        return int(0.9 * total)
    _, available = ram_bytes()
    return process_rss() + int(0.8 * available)


# ---- checks -------------------------------------------------------------------------------------
def check_bitsandbytes(device: torch.device) -> str:
    """'' when a 4-bit NF4 layer runs forward and backward on ``device``; else the reason it does not."""
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # ImportError, or a broken native library raising anything
        return f"bitsandbytes cannot be imported ({type(exc).__name__}: {exc})"
    try:
        layer = bnb.nn.Linear4bit(64, 64, bias=False, quant_type="nf4", compute_dtype=torch.float32)
        layer = layer.to(device)
        x = torch.randn(2, 64, device=device, requires_grad=True)
        layer(x).sum().backward()
    except Exception as exc:  # bitsandbytes raises many types for unsupported devices
        return f"bitsandbytes {bnb.__version__} cannot run 4-bit layers on {device} ({exc})"
    return ""


def _train_trial(host: Any, rank: int, batch: int, seq_len: int, vocab: int, device: torch.device) -> None:
    """One forward+backward+optimizer step of a rank-``rank`` adapter on a random (batch, seq_len) batch."""
    host.activate(rank)
    params = host.trainable_parameters()
    ids = torch.randint(3, vocab, (batch, seq_len), device=device)  # (B, T)
    model = host.model
    model.train()
    try:
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        torch.optim.AdamW(params, lr=1e-4).step()
    finally:
        for param in params:
            param.grad = None
        model.eval()


def _fits(trial: Callable[[], None], device: torch.device, budget: int) -> tuple[bool, int]:
    """(whether ``trial`` ran within ``budget`` bytes, its peak bytes); out of memory = does not fit."""
    try:
        with PeakMemory(device) as peak:
            trial()
    except (torch.cuda.OutOfMemoryError, MemoryError):
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return False, budget + 1
    return peak.peak <= budget, peak.peak


def doubling(limit: int) -> list[int]:
    """1, 2, 4, ... up to ``limit`` (``limit`` itself last when it is not a power of two)."""
    values, value = [], 1
    while value < limit:
        values.append(value)
        value *= 2
    return [*values, limit]


def largest_fitting(
    candidates: Sequence[int], fits: Callable[[int], tuple[bool, int]], deadline: float
) -> tuple[int | None, int, bool]:
    """(largest candidate that fits, its peak bytes, whether the search stopped early on time)."""
    best, best_peak = None, 0
    for value in candidates:
        if time.monotonic() > deadline:
            return best, best_peak, True
        ok, peak = fits(value)
        if not ok:
            break
        best, best_peak = value, peak
    return best, best_peak, False


def _quiet_libraries() -> None:
    """Progress bars and deprecation chatter of transformers would bury the report."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


# ---- the whole check ----------------------------------------------------------------------------
def run_checks(args: argparse.Namespace, report: Report) -> None:
    """Fill ``report``; raise :class:`Unusable` at the first problem that stops this node joining."""
    from pollen.device import resolve_device
    from pollen.model import LoraHost, check_model_available, check_model_files, load_base_model
    from pollen.targets import TargetModulesError
    from tasks.embedded import resolve_model_name

    _quiet_libraries()
    try:
        device = resolve_device(args.device)
    except RuntimeError as exc:
        raise Unusable(str(exc).replace("model.device", "--device")) from None
    total, available = ram_bytes()
    report.add("RAM", f"{total / GB:.1f} GB total, {available / GB:.1f} GB available")
    if device.type == "cuda":
        free, vram = torch.cuda.mem_get_info(device)
        name = torch.cuda.get_device_name(device)
        report.add("device", f"{device} ({name})")
        report.add("GPU memory", f"{vram / GB:.1f} GB total, {free / GB:.1f} GB free")
    else:
        cuda = "no CUDA device visible" if not torch.cuda.is_available() else "CUDA present but not chosen"
        report.add("device", f"{device} ({cuda})")

    bnb_problem = check_bitsandbytes(device)
    report.add("bitsandbytes", f"4-bit on {device}: " + ("works" if not bnb_problem else bnb_problem))
    if bnb_problem and args.quantization in ("4bit", "8bit"):
        raise Unusable(f"--quantization {args.quantization} needs bitsandbytes: {bnb_problem}")

    if args.data_path:
        from tasks.data import DataError, load_file

        try:
            data = load_file(args.data_path, key="--data-path")
        except DataError as exc:
            raise Unusable(str(exc)) from None
        report.add("data", f"{args.data_path}: {len(data)} rows, columns {', '.join(data.column_names)}")
    else:
        report.add("data", "no --data-path: the node would train on its partition of the run's task")

    try:
        path = resolve_model_name(args.model)
        check_model_available(path)
        damage = check_model_files(path)  # a folder without weights or tokenizer, or truncated weights
        if damage:
            raise Unusable("; ".join(damage.values()))
        started = time.perf_counter()
        model_config = ModelConfig(args.model, args.quantization, str(device), "auto")
        base = load_base_model(path, model_config, device_override=str(device))
        targets = tuple(t.strip() for t in args.target_modules.split(",") if t.strip())
        host = LoraHost(base, LoraConfig(args.lora_rank, 2.0 * args.lora_rank, 0.0, targets))
    except Unusable:
        raise
    except TargetModulesError as exc:
        raise Unusable(str(exc).replace("lora.target-modules=", "--target-modules ")) from None
    except (OSError, ValueError, RuntimeError) as exc:
        raise Unusable(f"base model {args.model!r} does not load: {str(exc).splitlines()[0]}") from None
    footprint_of: Any = getattr(base, "get_memory_footprint", None)  # transformers models have it
    footprint = int(footprint_of()) if callable(footprint_of) else 0
    report.fingerprint = host.fingerprint
    report.add(
        "base model",
        f"{args.model} ({args.quantization}) loaded in {time.perf_counter() - started:.1f} s, "
        f"{_size(footprint)} of weights",
    )
    report.add("fingerprint", f"{host.fingerprint} (must equal the server's)")

    budget = int(args.memory_budget_gb * GB) if args.memory_budget_gb else default_budget(device)
    vocab = int(getattr(base.config, "vocab_size", 32))
    seq = args.max_seq_len
    deadline = time.monotonic() + args.time_budget
    where = "GPU memory" if device.type == "cuda" else "process memory"
    report.add("budget", f"{_size(budget)} of {where} for one training step of {seq} tokens")

    def rank_fits(rank: int) -> tuple[bool, int]:
        return _fits(lambda: _train_trial(host, rank, 1, seq, vocab, device), device, budget)

    ranks = doubling(max(args.max_rank, args.lora_rank))  # the configured rank is always tried
    max_rank, rank_peak, rank_cut = largest_fitting(ranks, rank_fits, deadline)
    if max_rank is None:
        raise Unusable(
            f"not even rank 1 with batch 1 at {seq} tokens fits in {_size(budget)}; lower "
            "--max-seq-len, use --quantization 4bit, or use a device with more memory"
        )
    report.max_rank = max_rank
    cut = " (stopped by --time-budget)" if rank_cut else ""
    report.add("largest rank", f"{max_rank} at batch 1, peak {_size(rank_peak)}{cut}")
    if args.lora_rank > max_rank:
        why = "was not reached within --time-budget" if rank_cut else "does not fit"
        raise Unusable(f"--lora-rank {args.lora_rank} {why}; the largest rank that fits is {max_rank}")

    def batch_fits(batch: int) -> tuple[bool, int]:
        return _fits(lambda: _train_trial(host, args.lora_rank, batch, seq, vocab, device), device, budget)

    deadline = max(deadline, time.monotonic() + 5.0)  # the batch search always gets a few seconds
    max_batch, batch_peak, batch_cut = largest_fitting(doubling(args.max_batch), batch_fits, deadline)
    report.max_batch = max_batch
    cut = " (stopped by --time-budget)" if batch_cut else ""
    report.add("largest batch", f"{max_batch} at rank {args.lora_rank}, peak {_size(batch_peak)}{cut}")
    if max_batch is None:
        raise Unusable(f"--lora-rank {args.lora_rank} fits only without a batch; lower --max-seq-len")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pollen-check",
        description="Check that this machine can join a Pollen federation before starting its SuperNode.",
    )
    parser.add_argument("--model", default="embedded", help="base model: 'embedded', a folder or an HF id")
    parser.add_argument("--quantization", default="4bit", choices=QUANTIZATIONS, help="base weights")
    parser.add_argument("--data-path", default="", help="this node's Alpaca-style data file")
    parser.add_argument("--lora-rank", type=int, default=8, help="the rank this node will train")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument("--max-seq-len", type=int, default=128, help="tokens per training example")
    parser.add_argument(
        "--target-modules", default=DEFAULT_TARGETS, help="'all-linear' or comma-separated LoRA targets"
    )
    parser.add_argument("--max-rank", type=int, default=64, help="largest rank to try")
    parser.add_argument("--max-batch", type=int, default=32, help="largest batch size to try")
    parser.add_argument(
        "--memory-budget-gb", type=float, default=0.0, help="memory one step may use (default: measured)"
    )
    parser.add_argument("--time-budget", type=float, default=120.0, help="seconds for the rank search")
    return parser


def _validate(args: argparse.Namespace) -> None:
    for name, low in (("lora_rank", 1), ("max_seq_len", 8), ("max_rank", 1), ("max_batch", 1)):
        value = getattr(args, name)
        if value < low:
            raise Unusable(f"--{name.replace('_', '-')} {value} is not valid: expected an integer >= {low}")
    if args.memory_budget_gb < 0 or args.time_budget <= 0:
        raise Unusable("--memory-budget-gb must be >= 0 (0 = measured) and --time-budget > 0")


def main(argv: Sequence[str] | None = None) -> int:
    """Print the report; 0 when the node can join as configured, 1 (with a one-line reason) otherwise."""
    args = build_parser().parse_args(argv)
    report = Report()
    report.add("pollen-check", f"torch {torch.__version__}, python {sys.version.split()[0]}")
    try:
        _validate(args)
        run_checks(args, report)
    except Unusable as exc:
        print(report.render())
        print(f"UNUSABLE: {exc}")
        return 1
    print(report.render())
    print(
        f"OK: this node can join with lora-rank <= {report.max_rank} and train.batch-size <= "
        f"{report.max_batch} at train.max-seq-len {args.max_seq_len} (fingerprint {report.fingerprint})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
