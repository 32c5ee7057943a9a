"""The downlink protocol alone: the server's payload and the node's view stay equal, round after round."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from pollen import protocol as P
from pollen.adapter import Adapter, LoraFactors, add
from pollen.codec import WireSpec
from pollen.downlink import View, apply_payload, build_payload, load_view, store_view

SCALE = 4.0


def _adapter(seed: int, rank: int = 4) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    return {"m": LoraFactors(torch.randn(rank, 64, generator=g), torch.randn(32, rank, generator=g), SCALE)}


def _node(payload_record: object, entries: dict[str, int], state: RecordDict) -> Adapter:
    """What a node does with a message: decode against its held view, keep the new view."""
    config = ConfigRecord(dict(entries))
    held = load_view(state, SCALE) if P.DOWNLINK_VERSION in config else None
    adapter, view = apply_payload(payload_record, config, SCALE, held)  # type: ignore[arg-type]
    if view is not None:
        store_view(state, view)
    return adapter


def test_by_change_the_node_decodes_exactly_what_the_server_expects() -> None:
    generator, state = torch.Generator().manual_seed(0), RecordDict()
    spec, adapter = WireSpec(bits=4), _adapter(0)
    view: View | None = None
    for step in range(4):
        payload = build_payload(adapter, view, spec, generator, by_change=True)
        assert payload.entries[P.DOWNLINK_BASE] == (P.NO_VIEW if step == 0 else step)
        received = _node(payload.record, payload.entries, state)
        assert torch.equal(received["m"].a, payload.received["m"].a)
        assert torch.equal(received["m"].b, payload.received["m"].b)
        view = View(payload.version or 0, payload.received)
        adapter = add(adapter, _adapter(10 + step), alpha=0.01)
    # quantization error does not pile up: the view tracks the adapter
    assert view is not None
    gap = (view.adapter["m"].b - adapter["m"].b).abs().max()
    assert float(gap) < 0.2 * float(adapter["m"].b.abs().max())


def test_a_whole_adapter_at_32_bits_is_sent_as_is_and_keeps_no_view() -> None:
    adapter = _adapter(1)
    payload = build_payload(adapter, None, WireSpec(bits=32), torch.Generator(), by_change=False)
    assert payload.entries == {} and payload.version is None and payload.received is adapter
    state = RecordDict()
    received = _node(payload.record, payload.entries, state)
    assert torch.equal(received["m"].a, adapter["m"].a) and VIEW_KEYS.isdisjoint(state.keys())


VIEW_KEYS = {"pollen-view", "pollen-view-version"}


def test_a_view_of_other_shapes_is_not_used() -> None:
    old = View(3, _adapter(2, rank=2))
    payload = build_payload(_adapter(3, rank=4), old, WireSpec(bits=4), torch.Generator(), by_change=True)
    assert payload.entries == {P.DOWNLINK_BASE: P.NO_VIEW, P.DOWNLINK_VERSION: 1}


def test_a_change_to_a_view_the_node_lacks_is_refused_in_one_line() -> None:
    payload = build_payload(_adapter(4), View(2, _adapter(5)), WireSpec(bits=4), torch.Generator(), True)
    with pytest.raises(ValueError, match="change to adapter version 2, but this node holds version None"):
        _node(payload.record, payload.entries, RecordDict())
    held = RecordDict()
    store_view(held, View(1, _adapter(5)))
    with pytest.raises(ValueError, match="holds version 1"):
        _node(payload.record, payload.entries, held)
