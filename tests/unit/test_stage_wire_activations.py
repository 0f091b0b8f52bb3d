"""The activations a neighbour sends for CheckFree's fit (:mod:`recoverkit.elastic.stage_wire`):
the receiver sizes the header itself and reads it as hostile input, field by field, before a
payload byte is allocated; and the hook that records a stage's pairs (:func:`record_pairs`)."""

from __future__ import annotations

import math

import pytest
import torch

from recoverkit.elastic.stage_recovery import record_pairs
from recoverkit.elastic.stage_wire import (
    INPUTS,
    MAX_ACTIVATION_BYTES,
    MAX_NDIM,
    OUTPUTS,
    Message,
    activation_header,
    activation_header_buffer,
    activation_layout,
    layout_of,
    nbytes,
    pack,
    unpack,
)
from recoverkit.errors import IntegrityError

COUNT, ROWS = 3, (2, 2, 1)
ENTRY = 2 + MAX_NDIM


def _tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(r, 5, 4, generator=g) for r in ROWS]


def _header() -> torch.Tensor:
    return activation_header(_tensors())


def _read(header: torch.Tensor, *, count: int = COUNT, rows=ROWS):
    return activation_layout(header, count=count, rows=rows, what="stage 1's outputs")


def test_a_header_round_trips_and_sizes_the_payload():
    ts = _tensors()
    layout = _read(activation_header(ts))
    assert layout == tuple((str(j), tuple(t.shape), torch.float32) for j, t in enumerate(ts))
    named = {str(j): t for j, t in enumerate(ts)}
    data = pack(named, layout_of(named))
    assert data.numel() == nbytes(layout)
    got = unpack(data, layout)
    assert all(torch.equal(got[str(j)], t) for j, t in enumerate(ts))
    assert _read(activation_header(ts), rows=None) == layout  # rows unknown: not checked


def _crafted(at: int, value: float) -> torch.Tensor:
    h = _header()
    h[at] = value
    return h


@pytest.mark.parametrize(
    "header, count, message",
    [
        (_crafted(0, 2.0), COUNT, "2 micro-batches announced, 3 expected"),
        (_crafted(0, -1.0), COUNT, "the count is -1.0"),
        (_crafted(0, math.nan), COUNT, "the count is nan"),
        (_crafted(1 + ENTRY + 0, 9.0), COUNT, "micro-batch 1's dtype code is 9.0"),
        (_crafted(1 + 0, 0.5), COUNT, "micro-batch 0's dtype code is 0.5"),
        (_crafted(1 + 1, MAX_NDIM + 1.0), COUNT, f"micro-batch 0's ndim is {MAX_NDIM + 1.0}"),
        (_crafted(1 + 1, 0.0), COUNT, "micro-batch 0's ndim is 0.0"),
        (_crafted(1 + 2 + 1, -5.0), COUNT, "micro-batch 0's dim 1 is -5.0, not an integer >= 1"),
        (_crafted(1 + 2 + 1, 0.0), COUNT, "micro-batch 0's dim 1 is 0.0"),
        (_crafted(1 + 2 + 2, math.nan), COUNT, "micro-batch 0's dim 2 is nan"),
        (_crafted(1 + 2 + 2, math.inf), COUNT, "micro-batch 0's dim 2 is inf"),
        (_crafted(1 + 2 + 1, 2.0**40), COUNT, "past MAX_ACTIVATION_BYTES"),
        (_crafted(1 + 2 + 5, 7.0), COUNT, "micro-batch 0 has values past its 3 dims"),
        (_crafted(1 + 2 * ENTRY + 2, 2.0), COUNT, "micro-batch 2 has 2 rows, this step's split gives 1"),
        (_header(), 4, "a header of 31 torch.float64 values, 41 float64 expected"),
        (_header().to(torch.float32), COUNT, "float64 expected"),
    ],
)
def test_a_crafted_header_is_refused_naming_what_is_wrong(header, count, message):
    with pytest.raises(IntegrityError, match="stage 1's outputs: .*") as e:
        activation_layout(header, count=count, rows=ROWS[:count] if count == COUNT else None,
                          what="stage 1's outputs")  # fmt: skip
    assert message in str(e.value), str(e.value)


def test_dims_that_each_pass_but_together_are_too_many_bytes_are_refused():
    h = _header()
    for d in range(3):
        h[1 + ENTRY + 2 + d] = 2.0**20  # micro-batch 1: 2**60 elements
    h[1 + ENTRY + 2] = 2.0  # its rows still as the split says
    with pytest.raises(IntegrityError, match="micro-batch 1's shape .* MAX_ACTIVATION_BYTES"):
        _read(h)
    assert MAX_ACTIVATION_BYTES == 1 << 32


def test_the_sender_refuses_what_cannot_travel():
    for bad in ([torch.zeros(2, 3, dtype=torch.int64)], [torch.zeros((1,) * (MAX_NDIM + 1))],
                [torch.zeros(0, 3)], [torch.zeros(())]):  # fmt: skip
        with pytest.raises(ValueError, match="cannot travel"):
            activation_header(bad)
    with pytest.raises(ValueError, match="a count >= 1"):
        activation_header_buffer(0)


def test_messages_carry_the_new_request_kinds():
    for kind in (OUTPUTS, INPUTS):
        msg = Message(kind, 1, 2, 7)
        assert Message.decode(msg.encode(), num_stages=4, what="t") == msg
    with pytest.raises(IntegrityError, match="out of range"):
        Message.decode(Message(INPUTS + 1, 1, 2, 7).encode(), num_stages=4, what="t")


def test_record_pairs_copies_each_call_and_unhooks():
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 4)
    xs = [torch.randn(2, 4, requires_grad=True) for _ in range(3)]
    with record_pairs(m, stage=2, num_stages=5) as pending:  # interior: inputs and outputs kept
        outs = [m(x) for x in xs]
    m(xs[0])  # unhooked
    assert len(pending.inputs) == len(pending.outputs) == 3
    for x, y, gx, gy in zip(xs, outs, pending.inputs, pending.outputs):
        assert torch.equal(gx, x) and torch.equal(gy, y)
        assert not gx.requires_grad and not gy.requires_grad
        assert gx.data_ptr() != x.data_ptr()  # a copy: the schedule reuses its buffers
    with torch.no_grad():
        xs[0].add_(1.0)
    assert not torch.equal(pending.inputs[0], xs[0])
    relu = torch.nn.ReLU()
    with record_pairs(relu, stage=2, num_stages=5) as meta:
        relu(torch.empty(2, 4, device="meta"))  # shape inference on meta tensors: skipped
    assert (meta.inputs, meta.outputs) == ([], [])
    # what no neighbour can ask for is not kept: the second stage's inputs, the last's outputs
    with record_pairs(m, stage=1, num_stages=4) as first:
        m(xs[1])
    with record_pairs(m, stage=3, num_stages=4) as last:
        m(xs[1])
    assert (len(first.inputs), len(first.outputs)) == (0, 1)
    assert (len(last.inputs), len(last.outputs)) == (1, 0)
