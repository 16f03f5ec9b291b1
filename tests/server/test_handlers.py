"""The opcode tables: every opcode the codec declares is parsed and has exactly one server
handler (registered next to it with ``@handles``), and the write flag drives read-only
refusals."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rdzv import wire
from rdzv.server import handlers
from rdzv.wire import Op, RequestParser

#: The requests that change the store (refused while the journal cannot be written).
WRITES = {
    Op.SET,
    Op.COMPARE_SET,
    Op.ADD,
    Op.DELETE_KEY,
    Op.APPEND,
    Op.MULTI_SET,
    Op.QUEUE_PUSH,
    Op.QUEUE_POP,
    Op.BARRIER,
    Op.EXT_ADD,
    Op.EXT_BARRIER,
    Op.EXT_QUEUE_POP_WAIT,
    Op.EXT_SET_EPHEMERAL,
    Op.EXT_SET_LEASE,
}


def test_every_opcode_has_its_own_handler() -> None:
    table = handlers.HANDLERS
    for op in Op:
        if op is Op.VALIDATE:
            continue
        assert table[op] is not table[Op.VALIDATE], f"{op.name} has no handler"
        assert table[op].__name__.startswith("_h_"), op.name
    assert len({table[op] for op in Op}) == len(Op)


def test_a_second_handler_for_an_opcode_is_refused() -> None:
    with pytest.raises(RuntimeError, match="two handlers for SET"):
        handlers.handles(Op.SET)(lambda server, conn, req: None)


def test_write_flags() -> None:
    assert set(handlers.WRITE_OPS) == WRITES
    assert [op for op in range(256) if handlers.IS_WRITE[op]] == sorted(WRITES)
    assert {op for op in WRITES if wire.is_extension(op)} == set(handlers.EXT_WRITE_OPS)


@pytest.mark.parametrize("op", [op for op in Op if op is not Op.VALIDATE])
def test_every_opcode_parses_after_negotiation(op: Op) -> None:
    """Each declared request is in the parser's tables (torch's before negotiating, the
    extensions only after): an unknown opcode would close the connection instead."""
    parser = RequestParser()
    parser.receive(wire.encode_validate())
    if wire.is_extension(op):
        parser.receive(wire.encode_ping(wire.RDZV_PING_NONCE))
    assert parser.error is None
    parser.receive(bytes((op,)))  # the start of the frame: parsed, waits for the rest
    assert parser.error is None, parser.error


def test_the_unknown_opcode_message_names_the_ranges_from_the_codec() -> None:
    parser = RequestParser()
    parser.receive(wire.encode_validate() + bytes((0x7F,)))
    torch_last = max(op for op in Op if not wire.is_extension(op))
    expected = f"torch 2.13 uses 0x00-{torch_last:#04x}, rdzv extensions 0x80-{max(Op):#04x}"
    assert expected in str(parser.error)


def test_the_c_fast_path_numbers_opcodes_as_the_codec() -> None:
    """_fastpath.c repeats the opcodes it executes (a C enum); any other opcode goes to the
    Python path, so a new opcode needs no C change, but these must stay the codec's."""
    source = (Path(handlers.__file__).parent / "_fastpath.c").read_text()
    enum = re.search(r"/\* Opcodes \(rdzv\.wire\.Op\)\. \*/\s*enum \{(.*?)\};", source, re.S)
    assert enum is not None
    entries = re.findall(r"OP_(\w+) = (0x[0-9A-Fa-f]+|\d+),", enum.group(1))
    assert len(entries) >= 9
    for name, value in entries:
        assert Op[name] == int(value, 0), name
