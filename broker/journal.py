"""Append-only journal of the broker's ledger, so a restarted broker loses nothing it acked.

File format: a sequence of records, each

    <u32 little-endian payload length> <u8 type> <u32 little-endian crc32 of payload> <payload>

Payloads are msgpack (no pickle). Types:

- PUT      one `Rollout`, stored and acked (counts as stored).
- RESTORE  one `Rollout` rewritten by a compaction (buffered or leased; counts nothing).
- DROP     `Drop`: rollout ids dropped as stale, with the reason; `arrived` marks rollouts that
           were stale on arrival (acked, counted as stored and dropped, never buffered).
- LEASE    `Lease`: rollout ids handed to a learner rank for one step.
- RETURN   `LeaseKeys`: leases taken back into the buffer (their learner session ended).
- CONSUME  `LeaseKeys`: leases committed with a learner checkpoint (they count as consumed).
- SEEN     `Ids`: ids consumed or dropped before the last compaction, kept for de-duplication.
- META     `Meta`: the version book, epoch counter and ledger counters at that point.

Replay stops at the first truncated or corrupt record (a crash in the middle of a write) and the
file is truncated there, so later appends start on a record boundary.

fsync policy (`broker.journal_fsync`): the broker acks a rollout only after its PUT record has been
handed to the OS (one writev() for the PUT records of one message), so killing the broker process
never loses an acked rollout. Whether
the OS has put it on disk depends on the policy: "always" fsyncs before every ack, "interval" at most
every `journal_fsync_interval_s`, "never" leaves it to the OS (a machine crash may lose the tail).
Under "interval" the fsync runs in a background thread: it covers everything written before it
started, and the broker goes on serving meanwhile; inline, it stalled every ack for as long as the
disk took to absorb a second of rollouts.

Compaction (`Ledger.compact`) rewrites the file as a snapshot of what is live. During a run it
runs in a background thread (`rewrite_in_background`): the snapshot is taken in the loop (lists
of references to immutable records), the thread encodes it into `<path>.tmp`, then copies after
it what the loop appended to the live file since the snapshot, and fsyncs; the loop itself copies
only the last few hundred kilobytes and renames the file into place (`poll_rewrite`), between two
fsyncs of the interval policy, whose next fsync covers those bytes. Inline, a rewrite of a few
thousand live rollouts stalled every ack for 0.3-1 s. Until the rename the live file holds
everything, so a crash mid-compaction loses nothing.
"""

from __future__ import annotations

import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import msgspec

from tether.common.messages import Rollout

PUT, RESTORE, DROP, LEASE, RETURN, CONSUME, SEEN, META = 1, 2, 3, 4, 5, 6, 7, 8
_HEADER = struct.Struct("<IBI")
_MAX_RECORD = 512 * 1024 * 1024
_IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX")) if hasattr(os, "sysconf") else 16
# What a background compaction leaves for the loop to copy when it swaps the files in.
_TAIL_FOR_LOOP = 256 * 1024


class Drop(msgspec.Struct, frozen=True):
    ids: list[str]
    reason: str
    arrived: bool = False


class Lease(msgspec.Struct, frozen=True):
    key: str
    session: str
    rank: int
    seq: int
    step: int
    ids: list[str]


class LeaseKeys(msgspec.Struct, frozen=True):
    keys: list[str]


class Ids(msgspec.Struct, frozen=True):
    ids: list[str]


class Meta(msgspec.Struct, frozen=True):
    """Everything the broker must not forget across a restart besides rollouts."""

    latest_version: int
    lineage: list[tuple[str, int]]
    """(learner session, fork version), oldest first."""
    epoch: int
    """Newest weight-group epoch number handed out (epochs never repeat)."""
    committed_version: int
    session: str
    stored_total: int
    consumed_total: int
    dropped_stale_total: int


_TYPES: dict[int, type] = {PUT: Rollout, RESTORE: Rollout, DROP: Drop, LEASE: Lease, RETURN: LeaseKeys,
                           CONSUME: LeaseKeys, SEEN: Ids, META: Meta}
_encoder = msgspec.msgpack.Encoder()
_decoders = {kind: msgspec.msgpack.Decoder(cls) for kind, cls in _TYPES.items()}


def _frame(kind: int, payload: bytes) -> bytes:
    return _HEADER.pack(len(payload), kind, zlib.crc32(payload)) + payload


def frame(kind: int, value) -> bytes:
    """One encoded record (exposed for compaction and tests)."""
    return _frame(kind, _encoder.encode(value))


class _Rewrite:
    """A compaction in a background thread: write `records` (the snapshot, encoded here) to `tmp`,
    then copy the live file's bytes from `start` (where it ended at the snapshot) until less than
    _TAIL_FOR_LOOP of them remain uncopied, and fsync. `written()` is the live file's size after the
    loop's last completed write."""

    def __init__(self, tmp: Path, records: Iterable[bytes], source: Path, start: int,
                 written: Callable[[], int], finished: int) -> None:
        self.tmp, self.source = tmp, source
        self.copied_to = start
        self.finished_at_snapshot = finished
        """The journal's finished_since_compaction when the snapshot was taken."""
        self.error: BaseException | None = None
        self.cancelled = False
        self._records, self._written = records, written
        self.thread = threading.Thread(target=self._run, name="journal-compaction", daemon=True)

    def _run(self) -> None:
        try:
            with open(self.tmp, "wb") as out, open(self.source, "rb") as src:
                for blob in self._records:
                    if self.cancelled:
                        return
                    out.write(blob)
                while not self.cancelled and self._written() - self.copied_to > _TAIL_FOR_LOOP:
                    self.copy_tail(src, out, self._written())
                out.flush()
                os.fsync(out.fileno())
        except BaseException as exc:  # raised in the loop (poll_rewrite), as a failed fsync is
            self.error = exc

    def copy_tail(self, src, out, end: int) -> None:
        """Append the live file's bytes [copied_to, end) to `out`."""
        src.seek(self.copied_to)
        remaining = end - self.copied_to
        while remaining:
            chunk = src.read(min(remaining, 1 << 20))
            if not chunk:
                raise OSError(f"{self.source} ended at {end - remaining}, before {end}")
            out.write(chunk)
            remaining -= len(chunk)
        self.copied_to = end


class Journal:
    """Appends records to one file; `replay()` reads them back."""

    def __init__(
        self,
        path: str | Path,
        *,
        fsync: str = "interval",
        fsync_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        self._fsync_interval_s = fsync_interval_s
        self._clock = clock
        self._last_fsync = self._clock()
        self._dirty = False
        self._fd: int | None = None
        self._syncer: threading.Thread | None = None  # the background fsync of the interval policy
        self._sync_error: OSError | None = None
        self._size = 0  # of the live file after the last completed write (valid while _fd is open)
        self._rewrite: _Rewrite | None = None
        self._remover: threading.Thread | None = None  # unlinks the file a compaction replaced
        for leftover in (self._tmp_path(), self._old_path()):  # of a broker killed mid-compaction
            leftover.unlink(missing_ok=True)
        self.finished_since_compaction = 0
        """Rollouts consumed or dropped since the file was last rewritten (drives compaction)."""

    # ---- reading

    def replay(self) -> Iterator[tuple[int, object]]:
        """Yield (type, value) for every intact record; truncate a damaged tail."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            data = f.read()
        good = offset = 0
        while offset + _HEADER.size <= len(data):
            length, kind, crc = _HEADER.unpack_from(data, offset)
            start = offset + _HEADER.size
            if length > _MAX_RECORD or start + length > len(data) or kind not in _decoders:
                break
            payload = data[start : start + length]
            if zlib.crc32(payload) != crc:
                break
            try:
                value = _decoders[kind].decode(payload)
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
                break
            offset = good = start + length
            yield kind, value
        if good < len(data):
            # A torn write at the end (kill -9 mid-write): cut it so appends stay aligned.
            with open(self.path, "r+b") as f:
                f.truncate(good)

    # ---- writing

    def _open(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self._size = os.fstat(self._fd).st_size
        return self._fd

    def _write(self, blob: bytes) -> None:
        fd = self._open()
        view = memoryview(blob)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        self._size += len(blob)
        self._dirty = True
        if self._fsync == "always":
            self.sync()

    def _write_parts(self, parts: list) -> None:
        """Write the concatenation of `parts` (bytes-like) without building it: writev, at most
        IOV_MAX parts a call; a short write finishes with the rest joined."""
        fd = self._open()
        for start in range(0, len(parts), _IOV_MAX):
            chunk = parts[start : start + _IOV_MAX]
            written = os.writev(fd, chunk)
            size = sum(map(len, chunk))
            if written < size:
                view = memoryview(b"".join(chunk))[written:]
                while view:
                    view = view[os.write(fd, view):]
            self._size += size
        self._dirty = True
        if self._fsync == "always":
            self.sync()

    def put(self, rollouts: Sequence[Rollout], raw: Sequence[bytes | msgspec.Raw | None] | None = None) -> None:
        """PUT records, one write. `raw[i]`, when given, is the msgpack encoding of `rollouts[i]` as
        received: it is journaled as is (replay decodes it to an equal Rollout), saving an encode."""
        parts: list[bytes | msgspec.Raw] = []
        for i, rollout in enumerate(rollouts):
            payload = raw[i] if raw is not None and raw[i] is not None else _encoder.encode(rollout)
            parts += (_HEADER.pack(len(payload), PUT, zlib.crc32(payload)), payload)
        if parts:
            self._write_parts(parts)

    def drop(self, ids: list[str], reason: str, *, arrived: bool = False) -> None:
        if ids:
            self._write(frame(DROP, Drop(ids=ids, reason=reason, arrived=arrived)))
            self.finished_since_compaction += len(ids)

    def lease(self, lease: Lease) -> None:
        self._write(frame(LEASE, lease))

    def returned(self, keys: list[str]) -> None:
        if keys:
            self._write(frame(RETURN, LeaseKeys(keys=keys)))

    def consumed(self, keys: list[str], count: int) -> None:
        if keys:
            self._write(frame(CONSUME, LeaseKeys(keys=keys)))
            self.finished_since_compaction += count

    def meta(self, meta: Meta) -> None:
        self._write(frame(META, meta))

    def maybe_sync(self) -> None:
        """Apply the interval policy and finish a background compaction that is done; call from the
        server loop. The fsync runs in the background; while one is still running the next waits
        for it (never two at once)."""
        self.poll_rewrite()
        self._raise_sync_error()
        if self._fsync != "interval" or not self._dirty or self._fd is None:
            return
        if self._clock() - self._last_fsync < self._fsync_interval_s:
            return
        if self._syncer is not None:
            if self._syncer.is_alive():
                return
            self._syncer = None
        self._dirty = False  # what is written from now on waits for the next fsync
        self._last_fsync = self._clock()
        self._syncer = threading.Thread(target=self._background_fsync, args=(self._fd,), name="journal-fsync",
                                        daemon=True)
        self._syncer.start()

    def _background_fsync(self, fd: int) -> None:
        try:
            os.fsync(fd)  # releases the GIL: the loop goes on serving
        except OSError as exc:
            self._sync_error = exc

    def _wait_for_background_sync(self) -> None:
        """Before the descriptor is fsynced inline, closed or replaced."""
        if self._syncer is not None:
            self._syncer.join()
            self._syncer = None
        self._raise_sync_error()

    def _raise_sync_error(self) -> None:
        # A failed fsync is the broker's problem as much as when it ran inline: raise it in the loop.
        error, self._sync_error = self._sync_error, None
        if error is not None:
            raise error

    def sync(self) -> None:
        self._wait_for_background_sync()
        if self._fd is not None and self._dirty:
            os.fsync(self._fd)
            self._dirty = False
        self._last_fsync = self._clock()

    @property
    def rewriting(self) -> bool:
        """A background compaction is under way (started, not yet swapped in)."""
        return self._rewrite is not None

    def _tmp_path(self) -> Path:
        return self.path.with_suffix(self.path.suffix + ".tmp")

    def rewrite_in_background(self, records: Iterable[bytes]) -> bool:
        """Compact without stalling the caller: `records` (framed, over a snapshot that later
        appends do not change) are written by a thread, followed by what is appended meanwhile;
        `poll_rewrite` swaps the result in once the thread is done. False if one is under way."""
        if self._rewrite is not None:
            return False
        self._open()  # the file exists and _size is its length: the snapshot's end
        self._rewrite = _Rewrite(self._tmp_path(), records, self.path, self._size, lambda: self._size,
                                 self.finished_since_compaction)
        self._rewrite.thread.start()
        return True

    def poll_rewrite(self, *, wait: bool = False) -> bool:
        """Swap in a finished background compaction (waiting for it with `wait`): copy the live
        file's last bytes after it and rename it over the live file. Returns whether it swapped."""
        rewrite = self._rewrite
        if rewrite is None:
            return False
        if wait:
            rewrite.thread.join()
        elif rewrite.thread.is_alive() or (self._syncer is not None and self._syncer.is_alive()):
            return False  # the live file's fsync uses its descriptor: swap between two fsyncs, not during one
        self._rewrite = None
        if rewrite.error is not None:
            rewrite.tmp.unlink(missing_ok=True)  # the live file still holds everything
            raise rewrite.error
        with open(rewrite.tmp, "r+b") as out, open(self.path, "rb") as src:
            out.seek(0, os.SEEK_END)
            rewrite.copy_tail(src, out, self._size)
            out.flush()
            if self._fsync == "always":
                os.fsync(out.fileno())  # the tail was fsynced in the old file: so it must be here
        self._wait_for_background_sync()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._replace_keeping_old(rewrite.tmp)
        # The snapshot and the bulk of the tail were fsynced by the thread; the last bytes copied here
        # are as durable as they were in the old file, and the next fsync of the policy covers them
        # (an fsync here stalled the loop 0.3-0.4 s: it flushes whatever else the disk holds).
        self._dirty = self._fsync != "always"
        self.finished_since_compaction -= rewrite.finished_at_snapshot
        return True

    def _replace_keeping_old(self, new: Path) -> None:
        """Rename `new` over the live file; the old file's blocks are freed by a thread.

        Freeing them in the rename (the old file's last link) took 0.37-0.39 s for a journal of a few
        hundred megabytes here: a second link keeps them until the thread removes it. The live
        path exists throughout; a crash leaves at most the `.old` link, removed at the next start."""
        self._join_remover()
        old: Path | None = self._old_path()
        try:
            old.unlink(missing_ok=True)
            os.link(self.path, old)
        except OSError:  # no live file yet (a first start), or a file system without hard links
            old = None
        os.replace(new, self.path)
        if old is not None:
            self._remover = threading.Thread(target=old.unlink, kwargs={"missing_ok": True},
                                             name="journal-remove-old", daemon=True)
            self._remover.start()

    def _old_path(self) -> Path:
        return self.path.with_suffix(self.path.suffix + ".old")

    def _join_remover(self) -> None:
        if self._remover is not None:
            self._remover.join()
            self._remover = None

    def _cancel_rewrite(self) -> None:
        rewrite, self._rewrite = self._rewrite, None
        if rewrite is not None:
            rewrite.cancelled = True
            rewrite.thread.join()
            rewrite.tmp.unlink(missing_ok=True)

    def rewrite(self, records: Iterable[bytes]) -> None:
        """Compact: atomically replace the file with `records` (already framed), in this thread."""
        self._cancel_rewrite()
        tmp = self._tmp_path()
        with open(tmp, "wb") as f:
            for blob in records:
                f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        self.close()
        self._replace_keeping_old(tmp)
        self.finished_since_compaction = 0
        self._dirty = False

    def close(self) -> None:
        """Stop (an unfinished compaction is abandoned: the live file holds everything) and close."""
        self._cancel_rewrite()
        self._join_remover()
        self._wait_for_background_sync()
        if self._fd is not None:
            if self._dirty:
                os.fsync(self._fd)
                self._dirty = False
            os.close(self._fd)
            self._fd = None
