"""Optional coverage-guided fuzzing of the codec with atheris (libFuzzer), not run by CI.

    pip install atheris   # a manylinux wheel exists for CPython 3.11 x86_64
    PYTHONPATH=src python -m tests.fuzz.atheris_codec -runs=1000000 [-max_len=512] [corpus/]

The first input byte picks the target (request parser, with or without extensions, or the
reply decoders), the second how to split the rest; the properties are those of
:mod:`tests.fuzz.harness` (only NeedData/ProtocolError may escape the codec).
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from rdzv import wire  # noqa: F401  (instrumented for coverage)
    from tests.fuzz import harness


def one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    target, step, stream = data[0] % 3, data[1] % 16 + 1, data[2:]
    cuts = list(range(step, len(stream), step))
    if target == 2:
        order = [b % len(harness.DECODERS) for b in stream[:4]] or [0]
        harness.check_reply_decoders(stream, cuts, order)
    else:
        harness.check_request_parser(stream, cuts, extensions=target == 0)


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
