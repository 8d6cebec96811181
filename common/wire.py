"""The one envelope every ZeroMQ message travels in, and its typed codec.

Wire format (msgpack map, unknown fields refused):

    {"kind": str, "schema": int, "sender": str, "msg_id": str, "body": <record map>}

`kind` selects the body's record type from `tether.common.messages.BODY_TYPES`; `schema` must
equal `SCHEMA_VERSION`. Decoding happens in two typed steps (envelope, then body by kind) so an
unknown kind or a wrong schema is reported as such, never as a confusing body error.

A SubmitRollouts body is decoded one rollout at a time, keeping each rollout's bytes as sent
(`Message.raw_rollouts`): the broker journals those bytes instead of encoding every rollout again.
The contents of the rollouts' arrays are checked once for the whole message (see
`messages.decode_rollouts`); when any check fails, the body is decoded again rollout by rollout
with every check in place, so the error names the rollout and the rule exactly as before.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import msgspec

from tether.common.errors import WireDecodeError
from tether.common.messages import (
    BODY_TYPES,
    SCHEMA_VERSION,
    Record,
    Rollout,
    SubmitRollouts,
    decode_rollouts,
)

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class Envelope(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    kind: str
    schema: int
    sender: str
    msg_id: str
    body: msgspec.Raw


class _OutgoingEnvelope(msgspec.Struct, frozen=True):
    """`Envelope` with the body record in place: encodes to the same bytes in one pass (encoding the
    body first and then the envelope around it copied every message twice, a RolloutBatch of
    megabytes included)."""

    kind: str
    schema: int
    sender: str
    msg_id: str
    body: Record


@dataclass(frozen=True)
class Message:
    """A decoded envelope with its typed body."""

    kind: str
    sender: str
    msg_id: str
    body: Record
    raw_rollouts: list[msgspec.Raw] | None = None
    """SubmitRollouts: the msgpack bytes of each rollout as sent, in the order of body.rollouts."""
    max_token_id: int | None = None
    """SubmitRollouts: the largest prompt or completion token id of any rollout (-1: none)."""


class _RawSubmit(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """SubmitRollouts with its rollouts left undecoded (the same fields, checked the same way)."""

    rollouts: list[msgspec.Raw]


# msgspec reports most problems as DecodeError/ValidationError, but invalid UTF-8 in a string
# surfaces as UnicodeDecodeError and absurd sizes inside __post_init__ checks as numpy's
# ValueError/MemoryError; all of them are the peer's fault and become WireDecodeError.
_DECODE_FAILURES = (msgspec.MsgspecError, ValueError, TypeError, OverflowError, MemoryError, RecursionError)

_ENCODER = msgspec.msgpack.Encoder()
_ENVELOPE_DECODER = msgspec.msgpack.Decoder(Envelope)
_BODY_DECODERS = {kind: msgspec.msgpack.Decoder(cls) for kind, cls in BODY_TYPES.items()}
_RAW_SUBMIT_DECODER = msgspec.msgpack.Decoder(_RawSubmit)
_ROLLOUT_DECODER = msgspec.msgpack.Decoder(Rollout)


def new_msg_id() -> str:
    return uuid.uuid4().hex


def encode(body: Record, *, sender: str, msg_id: str | None = None) -> bytes:
    """Encode `body` in an envelope from `sender`."""
    kind = type(body).KIND
    if kind not in BODY_TYPES or BODY_TYPES[kind] is not type(body):
        raise TypeError(f"{type(body).__name__} is not a wire record")
    return _ENCODER.encode(_OutgoingEnvelope(kind, SCHEMA_VERSION, sender, msg_id or new_msg_id(), body))


def decode_envelope(data: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Envelope:
    """Decode and check the envelope only, leaving the body raw (for routing or rejection)."""
    if len(data) > max_bytes:
        raise WireDecodeError(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        envelope = _ENVELOPE_DECODER.decode(data)
    except _DECODE_FAILURES as exc:
        raise WireDecodeError(f"malformed envelope: {exc}") from None
    if envelope.schema != SCHEMA_VERSION:
        raise WireDecodeError(
            f"$.schema: schema version {envelope.schema} from {envelope.sender!r}, expected {SCHEMA_VERSION}"
        )
    if envelope.kind not in _BODY_DECODERS:
        raise WireDecodeError(f"$.kind: unknown message kind {envelope.kind!r}")
    return envelope


def decode(data: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message:
    """Decode and validate one message. Raises only `WireDecodeError`, whatever the bytes."""
    envelope = decode_envelope(data, max_bytes=max_bytes)
    if envelope.kind == SubmitRollouts.KIND:
        decoded = _decode_submit_raw(envelope.body)
        if decoded is not None:
            return Message(kind=envelope.kind, sender=envelope.sender, msg_id=envelope.msg_id, body=decoded[0],
                           raw_rollouts=decoded[1], max_token_id=decoded[2])
    try:
        body = _BODY_DECODERS[envelope.kind].decode(envelope.body)
    except _DECODE_FAILURES as exc:
        raise WireDecodeError(f"{envelope.kind} body: {_with_root(str(exc))}") from None
    return Message(kind=envelope.kind, sender=envelope.sender, msg_id=envelope.msg_id, body=body)


def _decode_submit_raw(body: msgspec.Raw) -> tuple[SubmitRollouts, list[msgspec.Raw], int] | None:
    """The SubmitRollouts, each rollout's raw bytes and the largest token id, decoded one rollout
    at a time with the same checks; None when anything is wrong, and the caller decodes the body in
    one piece to report the problem exactly as a whole-body decode always has."""
    try:
        raws = _RAW_SUBMIT_DECODER.decode(body).rollouts
        decoded = decode_rollouts(_ROLLOUT_DECODER, raws)
        return (SubmitRollouts(rollouts=decoded[0]), raws, decoded[1]) if decoded is not None else None
    except _DECODE_FAILURES:
        return None


def _with_root(message: str) -> str:
    # msgspec paths are relative to the body; make them read as `$.body.field`.
    return message.replace("at `$", "at `$.body")
