"""Append-only journal of the rollout buffer, so a restarted broker serves every acked rollout.

File format: a sequence of records, each

    <u32 little-endian payload length> <u8 type> <u32 little-endian crc32 of payload> <payload>

with types PUT (payload: one msgpack-encoded `Rollout`), DONE (payload: msgpack list of rollout
ids consumed by a learner or dropped as stale) and SEEN (payload: msgpack list of rollout ids
consumed before the last compaction, kept so de-duplication survives a restart). No pickle.

Replay stops at the first truncated or corrupt record (a crash in the middle of a write) and the
file is truncated there, so later appends start on a record boundary.

fsync policy (`broker.journal_fsync`): the broker acks a rollout only after its PUT record has been
handed to the OS with write(), so killing the broker process never loses an acked rollout. Whether
the OS has put it on disk depends on the policy: "always" fsyncs before every ack, "interval" at most
every `journal_fsync_interval_s`, "never" leaves it to the OS (a machine crash may lose the tail).
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import msgspec

from tether.common.messages import Rollout

PUT = 1
DONE = 2
SEEN = 3
_HEADER = struct.Struct("<IBI")
_MAX_RECORD = 512 * 1024 * 1024

_encoder = msgspec.msgpack.Encoder()
_rollout_decoder = msgspec.msgpack.Decoder(Rollout)
_ids_decoder = msgspec.msgpack.Decoder(list[str])


def _frame(kind: int, payload: bytes) -> bytes:
    return _HEADER.pack(len(payload), kind, zlib.crc32(payload)) + payload


class Journal:
    """Appends PUT/DONE/SEEN records to one file; `replay()` reads them back."""

    def __init__(
        self,
        path: str | Path,
        *,
        fsync: str = "interval",
        fsync_interval_s: float = 1.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        import time

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        self._fsync_interval_s = fsync_interval_s
        self._clock = clock or time.monotonic
        self._last_fsync = self._clock()
        self._dirty = False
        self._fd: int | None = None
        self.done_since_compaction = 0

    # ---- reading

    def replay(self) -> Iterator[tuple[int, object]]:
        """Yield (type, Rollout | list[str]) for every intact record; truncate a damaged tail."""
        if not self.path.exists():
            return
        good = 0
        with open(self.path, "rb") as f:
            data = f.read()
        offset = 0
        while offset + _HEADER.size <= len(data):
            length, kind, crc = _HEADER.unpack_from(data, offset)
            start = offset + _HEADER.size
            if length > _MAX_RECORD or start + length > len(data):
                break
            payload = data[start : start + length]
            if zlib.crc32(payload) != crc or kind not in (PUT, DONE, SEEN):
                break
            try:
                value = _rollout_decoder.decode(payload) if kind == PUT else _ids_decoder.decode(payload)
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
                break
            offset = start + length
            good = offset
            yield kind, value
        if good < len(data):
            # A torn write at the end (kill -9 mid-write): cut it so appends stay aligned.
            with open(self.path, "r+b") as f:
                f.truncate(good)

    # ---- writing

    def _open(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        return self._fd

    def _write(self, blob: bytes) -> None:
        fd = self._open()
        view = memoryview(blob)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        self._dirty = True
        if self._fsync == "always":
            self.sync()

    def put(self, rollouts: Iterable[Rollout]) -> None:
        blob = b"".join(_frame(PUT, _encoder.encode(r)) for r in rollouts)
        if blob:
            self._write(blob)

    def done(self, rollout_ids: list[str]) -> None:
        if rollout_ids:
            self._write(_frame(DONE, _encoder.encode(rollout_ids)))
            self.done_since_compaction += len(rollout_ids)

    def maybe_sync(self) -> None:
        """Apply the interval policy; call from the server loop."""
        if self._fsync == "interval" and self._dirty and self._clock() - self._last_fsync >= self._fsync_interval_s:
            self.sync()

    def sync(self) -> None:
        if self._fd is not None and self._dirty:
            os.fsync(self._fd)
            self._dirty = False
        self._last_fsync = self._clock()

    def rewrite(self, seen_ids: list[str], live: Iterable[Rollout]) -> None:
        """Compact: atomically replace the file with SEEN(seen_ids) plus one PUT per live rollout."""
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with open(tmp, "wb") as f:
            if seen_ids:
                f.write(_frame(SEEN, _encoder.encode(seen_ids)))
            for rollout in live:
                f.write(_frame(PUT, _encoder.encode(rollout)))
            f.flush()
            os.fsync(f.fileno())
        self.close()
        os.replace(tmp, self.path)
        self.done_since_compaction = 0
        self._dirty = False

    def close(self) -> None:
        if self._fd is not None:
            if self._dirty:
                os.fsync(self._fd)
                self._dirty = False
            os.close(self._fd)
            self._fd = None
