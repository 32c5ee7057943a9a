"""The downlink by change: both halves, the server's encoding and the node's decoding, in one place.

With a quantized downlink, the server sends each node the change from the adapter that node already
holds (its *view*, numbered by a version) instead of the whole adapter; what quantization drops from
one change is still part of the next. Both sides keep the same view: the server the adapter as the
node will decode it, the node the adapter it decoded. A message names the view its change applies to
(``protocol.DOWNLINK_BASE``, or ``NO_VIEW`` for a whole adapter) and the version the result becomes.
A node that holds another version refuses the message; the server then resends the whole adapter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from pollen import protocol as P
from pollen.adapter import Adapter, add, flatten, subtract, unflatten
from pollen.codec import WireSpec, decode, encode

# context.state keys on the node: the adapter of its view, and the view's version.
VIEW_STATE = "pollen-view"
VIEW_VERSION_STATE = "pollen-view-version"


@dataclass(frozen=True)
class View:
    """An adapter a node holds, and its version (1 for the first whole adapter, then +1 per change)."""

    version: int
    adapter: Adapter


@dataclass(frozen=True)
class Payload:
    """What the server sends one node: the encoded record, the config entries that describe it, and
    the adapter as the node will decode it (the node's next view when ``version`` is set)."""

    record: ArrayRecord
    entries: dict[str, int]  # DOWNLINK_BASE / DOWNLINK_VERSION; empty when not sent by change
    received: Adapter
    version: int | None  # the view this message makes; None when not sent by change


def same_shapes(left: Adapter, right: Adapter) -> bool:
    """True when both adapters cover the same modules with factors of the same shapes."""
    return left.keys() == right.keys() and all(
        left[m].a.shape == right[m].a.shape and left[m].b.shape == right[m].b.shape for m in left
    )


def build_payload(
    adapter: Adapter, view: View | None, spec: WireSpec, generator: torch.Generator, by_change: bool
) -> Payload:
    """Encode ``adapter`` for a node that holds ``view`` (None: nothing usable, send it whole).

    ``by_change`` False sends the whole adapter and keeps no view (evaluation, a 32-bit downlink, or
    feedback off). A view of other shapes (the node's rank changed) is not usable.
    """
    if not by_change or (view is not None and not same_shapes(view.adapter, adapter)):
        view = None
    tensors = flatten(adapter) if view is None else flatten(subtract(adapter, view.adapter))
    record = encode(tensors, spec, generator)
    scale = next(iter(adapter.values())).scale
    if spec.bits == 32 and view is None:
        received = adapter
    else:
        change = unflatten(decode(record), scale)
        received = change if view is None else add(view.adapter, change)
    if not by_change:
        return Payload(record=record, entries={}, received=received, version=None)
    base = P.NO_VIEW if view is None else view.version
    version = (0 if view is None else view.version) + 1
    entries = {P.DOWNLINK_BASE: base, P.DOWNLINK_VERSION: version}
    return Payload(record=record, entries=entries, received=received, version=version)


def apply_payload(
    record: ArrayRecord, config: Mapping[str, Any], scale: float, held: View | None
) -> tuple[Adapter, View | None]:
    """The adapter a message carries (decoded whole, or added to the ``held`` view), and the node's new view.

    ValueError when the message is a change to a view the node does not hold.
    """
    payload = unflatten(decode(record), scale)
    if P.DOWNLINK_VERSION not in config:
        return payload, None
    base = P.config_int(config, P.DOWNLINK_BASE)
    if base == P.NO_VIEW:
        adapter = payload
    elif held is None or held.version != base:
        have = None if held is None else held.version
        raise ValueError(
            f"the server sent a change to adapter version {base}, but this node holds version {have!r}; "
            "the server resends the whole adapter next round"
        )
    else:
        adapter = add(held.adapter, payload)
    return adapter, View(version=P.config_int(config, P.DOWNLINK_VERSION), adapter=adapter)


def load_view(state: RecordDict, scale: float) -> View | None:
    """The view a node keeps in its ``context.state``, or None when it holds none."""
    meta = state.config_records.get(VIEW_VERSION_STATE)
    record = state.array_records.get(VIEW_STATE)
    if meta is None or record is None:
        return None
    version = P.config_int(meta, P.DOWNLINK_VERSION)
    return View(version=version, adapter=unflatten(dict(record.to_torch_state_dict()), scale))


def store_view(state: RecordDict, view: View) -> None:
    """Keep ``view`` in the node's ``context.state`` for the next message."""
    state[VIEW_STATE] = ArrayRecord({k: v.contiguous() for k, v in flatten(view.adapter).items()})
    state[VIEW_VERSION_STATE] = ConfigRecord({P.DOWNLINK_VERSION: view.version})
