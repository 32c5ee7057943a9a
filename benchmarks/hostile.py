"""What a hostile reply costs the server: time and memory to reject it, against an honest reply's cost.

Usage: python benchmarks/hostile.py

A FedAvg strategy at the shipped 4-bit uplink holds a rank-8 adapter of SmolLM2-135M's attention and MLP
shapes (30 layers, 7 projections each). Each crafted reply goes through ``strategy.aggregate`` as a real
Flower Message; the table gives the wall time and how far the process's resident memory rose above
its level before the reply was handled (sampled every 5 ms). Writes the "hostile" section of
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402

from benchmarks.report import load_average, machine_line, write_section  # noqa: E402
from pollen import protocol as P  # noqa: E402
from pollen.adapter import Adapter, LoraFactors, flatten  # noqa: E402
from pollen.codec import WireSpec, encode, serialized_nbytes  # noqa: E402
from strategies.base import StrategySettings  # noqa: E402
from strategies.fedavg import FedAvgLora  # noqa: E402

RANK, ALPHA, LAYERS = 8, 16.0, 30
SHAPES = {  # (out_features, in_features) of SmolLM2-135M's linear layers
    "self_attn.q_proj": (576, 576),
    "self_attn.k_proj": (192, 576),
    "self_attn.v_proj": (192, 576),
    "self_attn.o_proj": (576, 576),
    "mlp.gate_proj": (1536, 576),
    "mlp.up_proj": (1536, 576),
    "mlp.down_proj": (576, 1536),
}
UPLINK = WireSpec(bits=4, block_size=64)


class OneNodeGrid:
    def get_node_ids(self) -> list[int]:
        return [1]


def global_adapter() -> Adapter:
    g = torch.Generator().manual_seed(0)
    return {
        f"model.layers.{layer}.{name}": LoraFactors(
            torch.randn(RANK, i, generator=g) * i**-0.5,
            torch.randn(o, RANK, generator=g) * 0.01,
            ALPHA / RANK,
        )
        for layer in range(LAYERS)
        for name, (o, i) in SHAPES.items()
    }


def raw(values: np.ndarray, dtype: str) -> Array:
    return Array(dtype=dtype, shape=(int(values.size),), stype="pollen.raw", data=values.tobytes())


def many_scalars(count: int = 100_000, block_size: int = 65_536) -> ArrayRecord:
    """100,000 0-d tensors at 8 bits, header block size 65,536: about 1.2 MB on the wire."""
    index = b"".join(b"0:t%d\0\0" % i for i in range(count))
    return ArrayRecord(
        {
            "header": raw(np.asarray([1, 8, 0, block_size, count], dtype="<i4"), "int32"),
            "index": raw(np.frombuffer(index, dtype=np.uint8), "uint8"),
            "scales": raw(np.full(count, 0x3F80, dtype="<u2"), "uint16"),
            "codes": raw(np.full(count, 128, dtype=np.uint8), "uint8"),
        }
    )


def wrong_name(sent: Adapter) -> ArrayRecord:
    """A valid 4-bit delta whose last tensor is a 64M-element one under a name the adapter lacks."""
    tensors = {name: torch.zeros_like(t) for name, t in flatten(sent).items()}
    tensors.pop(next(reversed(list(tensors))))
    tensors["model.layers.0.not_a_layer.B"] = torch.zeros(64 * 1024 * 1024)
    return encode(tensors, UPLINK)


def honest(sent: Adapter) -> ArrayRecord:
    g = torch.Generator().manual_seed(1)
    return encode({k: torch.randn(v.shape, generator=g) * 1e-3 for k, v in flatten(sent).items()}, UPLINK, g)


def reply(message: Message, record: ArrayRecord) -> Message:
    content = RecordDict(
        {
            P.DELTA: record,
            P.METRICS: MetricRecord({P.NUM_EXAMPLES: 100}),
            P.META: ConfigRecord({P.RANK: RANK, P.LORA_SCALE: ALPHA / RANK, P.FINGERPRINT: "bench"}),
        }
    )
    return Message(content=content, reply_to=message)


class RssRise:
    """How far resident memory rises above its starting level inside ``with`` (sampled every 5 ms)."""

    def __enter__(self) -> RssRise:
        import psutil

        self._process = psutil.Process()
        self._base = self._peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._process.memory_info().rss)

    @property
    def mib(self) -> float:
        return (self._peak - self._base) / 2**20


def measure(make: Callable[[Adapter], ArrayRecord]) -> tuple[float, float, float, str]:
    """(seconds, peak MiB while handled, reply MB on the wire, outcome) of one reply."""
    settings = StrategySettings(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_nodes=1,
        alpha=ALPHA,
        global_rank=RANK,
        fingerprint="bench",
        downlink=WireSpec(bits=32),
        seed=0,
        uplink=UPLINK,
    )
    strategy = FedAvgLora(settings)
    start = global_adapter()
    (message,) = strategy.train_messages(1, start, ConfigRecord(), OneNodeGrid())  # type: ignore[arg-type]
    answer = reply(message, make(start))
    size = serialized_nbytes(answer.content) / 1e6
    with RssRise() as rise:
        began = time.perf_counter()
        new, _ = strategy.aggregate(1, [answer])
        seconds = time.perf_counter() - began
    peak = rise.mib
    outcome = "accepted" if new is not None else f"rejected: {strategy.report.rejected[0][:90]}"
    return seconds, peak, size, outcome


def main() -> int:
    from flwr.supercore.task_identity import TaskIdentity

    # Messages are built outside a Flower run here, so give them the identity a run would.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    load = load_average()
    adapter_mib = sum(p.a.numel() + p.b.numel() for p in global_adapter().values()) * 4 / 2**20
    rows = [
        ("honest 4-bit delta", honest),
        ("100,000 0-d tensors, 8-bit, block size 65,536", lambda _: many_scalars()),
        ("valid 4-bit delta, one 64M-element tensor under a wrong name", wrong_name),
    ]
    lines = [
        "## Hostile replies: what rejecting one costs the server",
        "",
        "Command: `python benchmarks/hostile.py`  ",
        f"Machine: {machine_line(load)}.",
        "",
        f"A FedAvg strategy at a 4-bit uplink (block 64) holds a rank-{RANK} adapter of SmolLM2-135M shapes "
        f"({LAYERS} layers x 7 projections, {adapter_mib:.1f} MiB in float32). Each reply goes through "
        "`strategy.aggregate` as a real Flower Message; memory is how far the process's resident memory rose "
        "while it was handled (sampled every 5 ms; the received message was already in memory, and memory "
        "freed earlier in the process is reused, so the honest row understates what a decode takes).",
        "",
        "| reply | on the wire | outcome | seconds | memory rise |",
        "|---|---:|---|---:|---:|",
    ]
    for name, make in rows:
        seconds, peak, size, outcome = measure(make)
        lines.append(f"| {name} | {size:.2f} MB | {outcome} | {seconds:.3f} | {peak:.1f} MiB |")
        print(lines[-1], flush=True)
    section = "\n".join(lines)
    write_section("hostile", section)
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
