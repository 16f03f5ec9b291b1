"""The private channel between a store process and its metrics listener process
(:mod:`rdzv.observe.publisher`, :mod:`rdzv.observe.listener`): one end of a socketpair each.

A message is a 4-byte big-endian length and a JSON body, both ways (no pickle crosses a
process boundary in rdzv): the store process sends its snapshots
(:meth:`rdzv.stats.ServerSnapshot.to_json`), the listener its requests.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
from typing import Any

__all__ = ["MAX_MESSAGE", "WATCH_TIMEOUT", "Channel", "ChannelClosed"]

#: Seconds the store process keeps putting the status document in its states after the
#: listener last said it was asked for (snapshots alone otherwise).
WATCH_TIMEOUT = 10.0
#: Bytes a message may hold (a snapshot and a status document are a few KB to a few MB).
MAX_MESSAGE = 256 << 20

_LENGTH = struct.Struct(">I")


class ChannelClosed(ConnectionError):
    """The other end is gone (it exited or closed the channel)."""


class Channel:
    """One end of the channel over ``sock``; sends from several threads are serialized,
    receives belong to one thread."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()

    def send(self, message: Any) -> None:
        """Send ``message``; raises :class:`ChannelClosed` when the other end is gone."""
        body = json.dumps(message, separators=(",", ":")).encode()
        try:
            with self._send_lock:
                self.sock.sendall(_LENGTH.pack(len(body)) + body)
        except OSError as exc:
            raise ChannelClosed(str(exc)) from exc

    def _read(self, size: int) -> bytes:
        chunks = []
        while size:
            try:
                chunk = self.sock.recv(min(size, 1 << 20))
            except OSError as exc:
                raise ChannelClosed(str(exc)) from exc
            if not chunk:
                raise ChannelClosed("the other end closed the channel")
            chunks.append(chunk)
            size -= len(chunk)
        return b"".join(chunks)

    def receive(self) -> Any:
        """The next message (blocks); raises :class:`ChannelClosed` at the end, ValueError
        for a message that is too long or not JSON."""
        (size,) = _LENGTH.unpack(self._read(_LENGTH.size))
        if size > MAX_MESSAGE:
            raise ValueError(f"channel message of {size} bytes (at most {MAX_MESSAGE})")
        body = self._read(size)
        return json.loads(body)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
