"""Worker output: console prefixing, redirection to files, tee, and the stderr tail.

Each worker stream (stdout, stderr) is handled in one of three ways, torch's ``--redirects``
and ``--tee`` semantics:

=============  =================================================================
redirected     the worker writes straight into ``{attempt_dir}/{local_rank}/std{out,err}.log``
               (no copy through the agent); nothing on the console
tee            a pipe to the agent, which appends the bytes to the same file and prints
               each line with the worker's prefix
neither        a pipe to the agent, which prints each line with the prefix
=============  =================================================================

One :class:`LogPump` thread serves every pipe of the agent through a selector, so line
interleaving is per whole line and no thread is spent per stream. A partial line (no newline
yet) is printed after :data:`PARTIAL_LINE_DELAY` seconds so progress output stays visible.
The last lines of every stderr are kept (in memory, or re-read from the redirect file) for
the failure summary.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import selectors
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import IO, Any

from rdzv.launcher.config import Std

__all__ = [
    "PARTIAL_LINE_DELAY",
    "ConsoleWriter",
    "LogPump",
    "WorkerStreams",
    "console_writer",
    "format_prefix",
    "read_tail",
]

_log = logging.getLogger("rdzv.launcher.logs")

#: Seconds a partial line may wait for its newline before it is printed anyway.
PARTIAL_LINE_DELAY = 0.2
#: A line longer than this is printed in pieces (bytes).
MAX_LINE = 64 * 1024
_READ_SIZE = 64 * 1024

ConsoleWriter = Callable[[bytes], None]


def console_writer(stream: Any) -> ConsoleWriter:
    """A bytes writer for a text stream such as ``sys.stdout`` (its binary buffer when it has
    one, else decoded text), flushing after each write."""
    buffer = getattr(stream, "buffer", None)
    if buffer is not None:

        def write_bytes(data: bytes) -> None:
            buffer.write(data)
            buffer.flush()

        return write_bytes

    def write_text(data: bytes) -> None:
        stream.write(data.decode("utf-8", "replace"))
        stream.flush()

    return write_text


def format_prefix(template: str, *, rank: int, local_rank: int, role_name: str) -> bytes:
    """The console prefix of a worker from ``template`` (``${rank}``, ``${local_rank}``,
    ``${role_name}``; unknown ``${...}`` stay as written)."""
    text = Template(template).safe_substitute(rank=rank, local_rank=local_rank, role_name=role_name)
    return text.encode("utf-8")


def read_tail(path: Path, lines: int, max_bytes: int = 256 * 1024) -> list[str]:
    """The last ``lines`` lines of the file at ``path`` (at most ``max_bytes`` read); empty if
    it cannot be read."""
    if lines <= 0:
        return []
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return []
    text = data.decode("utf-8", "replace").splitlines()
    return text[-lines:]


@dataclass
class _Sink:
    """Where the bytes of one pipe go."""

    console: ConsoleWriter | None
    prefix: bytes
    file: IO[bytes] | None
    tail: collections.deque[bytes] | None
    pending: bytearray = field(default_factory=bytearray)
    pending_since: float = 0.0
    closed: threading.Event = field(default_factory=threading.Event)

    def _emit(self, line: bytes) -> None:
        if self.tail is not None:
            self.tail.append(line)
        if self.console is not None:
            self.console(self.prefix + line + b"\n")

    def feed(self, data: bytes, now: float) -> None:
        if self.file is not None:
            self.file.write(data)
            self.file.flush()
        if not self.pending:
            self.pending_since = now
        self.pending += data
        *lines, rest = bytes(self.pending).split(b"\n")
        for line in lines:
            self._emit(line)
        if lines:
            self.pending_since = now
        while len(rest) > MAX_LINE:
            self._emit(rest[:MAX_LINE])
            rest = rest[MAX_LINE:]
        self.pending = bytearray(rest)

    def flush_partial(self, now: float, force: bool = False) -> None:
        if self.pending and (force or now - self.pending_since >= PARTIAL_LINE_DELAY):
            self._emit(bytes(self.pending))
            self.pending.clear()

    def finish(self) -> None:
        self.flush_partial(0.0, force=True)
        if self.file is not None:
            self.file.close()
        self.closed.set()


class LogPump:
    """One thread copying every worker pipe to its sinks (console, file, tail).

    :meth:`add` registers a pipe (the read end, which the pump owns and closes at EOF);
    :meth:`wait_closed` waits for pipes to reach EOF; :meth:`close` stops the thread after
    closing whatever is still open.
    """

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._pending_adds: list[tuple[IO[bytes], _Sink]] = []
        self._sinks: dict[int, tuple[IO[bytes], _Sink]] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None

    def add(self, pipe: IO[bytes], sink: _Sink) -> None:
        """Start copying ``pipe`` (a readable binary pipe) to ``sink``."""
        with self._lock:
            if self._stopping:
                raise RuntimeError("LogPump.add after close()")
            self._pending_adds.append((pipe, sink))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="rdzv-log-pump", daemon=True)
                self._thread.start()
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # already signalled (pipe full), or closing
            os.write(self._wake_w, b"x")

    def _run(self) -> None:
        while True:
            with self._lock:
                adds, self._pending_adds = self._pending_adds, []
                stopping = self._stopping
            for pipe, sink in adds:
                fd = pipe.fileno()
                os.set_blocking(fd, False)
                self._sinks[fd] = (pipe, sink)
                self._selector.register(fd, selectors.EVENT_READ, None)
            if stopping:
                for fd in list(self._sinks):
                    self._drop(fd)
                return
            has_partial = any(s.pending for _, s in self._sinks.values())
            events = self._selector.select(PARTIAL_LINE_DELAY if has_partial else None)
            now = time.monotonic()
            for key, _ in events:
                fd = int(key.fd)
                if fd == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                    continue
                self._read(fd, now)
            for _, sink in self._sinks.values():
                sink.flush_partial(now)

    def _read(self, fd: int, now: float) -> None:
        entry = self._sinks.get(fd)
        if entry is None:
            return
        try:
            data = os.read(fd, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            _log.debug("reading worker pipe %d failed: %s", fd, exc)
            data = b""
        if not data:
            self._drop(fd)
            return
        try:
            entry[1].feed(data, now)
        except Exception:  # a broken console or full disk must not kill the pump
            _log.exception("copying worker output failed")

    def _drop(self, fd: int) -> None:
        pipe, sink = self._sinks.pop(fd)
        self._selector.unregister(fd)
        # Drain what is left without blocking (only on forced close).
        try:
            while data := os.read(fd, _READ_SIZE):
                sink.feed(data, time.monotonic())
        except OSError:
            pass
        pipe.close()
        try:
            sink.finish()
        except Exception:
            _log.exception("closing worker output failed")

    def close(self, timeout: float = 5.0) -> None:
        """Stop the pump: copy what is readable now, close every pipe and file."""
        with self._lock:
            self._stopping = True
            thread = self._thread
        self._wake()
        if thread is not None:
            thread.join(timeout)
        self._selector.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


class WorkerStreams:
    """The stdout/stderr arrangement of one worker for one attempt.

    Args:
        directory: this worker's log directory (``attempt_{n}/{local_rank}``), created when a
            stream is redirected or tee'd.
        redirect, tee: the streams selected by ``--redirects`` / ``--tee`` for this rank.
        console: whether this worker's output may reach the console (``--local-ranks-filter``).
        prefix: the console prefix.
        tail_lines: stderr lines to keep for the failure summary.
        stdout, stderr: console writers (default: the agent's own stdout and stderr).
    """

    def __init__(
        self,
        directory: Path,
        *,
        redirect: Std,
        tee: Std,
        console: bool,
        prefix: bytes,
        tail_lines: int,
        stdout: ConsoleWriter | None = None,
        stderr: ConsoleWriter | None = None,
    ) -> None:
        self.directory = directory
        self._tee = tee
        self._redirect = redirect & ~tee
        self._console = console
        self._prefix = prefix
        self._tail_lines = tail_lines
        self._writers = {
            Std.OUT: stdout or console_writer(sys.stdout),
            Std.ERR: stderr or console_writer(sys.stderr),
        }
        self._files: dict[Std, IO[bytes]] = {}
        self._sinks: list[_Sink] = []
        self._stderr_tail: collections.deque[bytes] | None = None
        if (self._redirect | tee) != Std.NONE:
            directory.mkdir(parents=True, exist_ok=True)

    def log_path(self, stream: Std) -> Path | None:
        """The file a stream is written to, or None if it only goes to the console."""
        if stream & (self._redirect | self._tee):
            return self.directory / ("stdout.log" if stream == Std.OUT else "stderr.log")
        return None

    def popen_args(self) -> dict[str, Any]:
        """``stdout``/``stderr`` arguments for :class:`subprocess.Popen`."""
        args: dict[str, Any] = {}
        for stream, name in ((Std.OUT, "stdout"), (Std.ERR, "stderr")):
            path = self.log_path(stream)
            if stream & self._redirect:
                assert path is not None
                file = open(path, "ab")  # noqa: SIM115 - closed in attach()
                self._files[stream] = file
                args[name] = file
            else:
                args[name] = subprocess.PIPE
        return args

    def attach(self, proc: subprocess.Popen[bytes], pump: LogPump) -> None:
        """After the spawn: close our copies of redirect files, hand the pipes to ``pump``."""
        for file in self._files.values():
            file.close()
        self._files.clear()
        for stream, pipe in ((Std.OUT, proc.stdout), (Std.ERR, proc.stderr)):
            if pipe is None:
                continue
            path = self.log_path(stream)
            tail: collections.deque[bytes] | None = None
            if stream == Std.ERR:
                tail = self._stderr_tail = collections.deque(maxlen=max(1, self._tail_lines))
            sink = _Sink(
                console=self._writers[stream] if self._console else None,
                prefix=self._prefix,
                file=open(path, "ab") if path is not None else None,  # noqa: SIM115
                tail=tail,
            )
            self._sinks.append(sink)
            pump.add(pipe, sink)

    def abort(self) -> None:
        """Close files opened by :meth:`popen_args` when the spawn failed."""
        for file in self._files.values():
            file.close()
        self._files.clear()

    def wait_closed(self, timeout: float) -> bool:
        """Wait until every pipe of this worker reached EOF; False on timeout."""
        deadline = time.monotonic() + timeout
        return all(s.closed.wait(max(0.0, deadline - time.monotonic())) for s in self._sinks)

    def stderr_tail(self) -> list[str]:
        """The last lines the worker wrote to stderr (from memory or its log file)."""
        if self._tail_lines <= 0:
            return []
        if self._stderr_tail is not None:
            lines = list(self._stderr_tail)
            return [line.decode("utf-8", "replace") for line in lines][-self._tail_lines :]
        path = self.log_path(Std.ERR)
        return read_tail(path, self._tail_lines) if path is not None else []
