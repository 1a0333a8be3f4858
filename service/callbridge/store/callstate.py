"""What the bridge stores of each call, and its encoding in the snapshot hash.

Per-call state is compact (it is stored for every tracked call): the status, a
sequence number and a fingerprint made of one CRC-32 per field. Field digests let
the diff name the changed fields of a ``call.updated`` without storing the item.

Encoding schema 2 (``v2|seq|fingerprint|status``, field names percent-encoded)
replaced schema 1 (``seq|fingerprint|status``, names raw: a name holding ``|`` or
``;`` corrupted the entry). Both are read; schema 2 is written.
"""

from __future__ import annotations

import binascii
import struct
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import orjson

# Fields with a fixed slot in the fingerprint; others are kept by name.
FINGERPRINT_FIELDS: tuple[str, ...] = (
    "external_id",
    "phone_number",
    "name",
    "duration_seconds",
    "started_at",
    "ended_at",
    "metadata",
)
_NOT_FINGERPRINTED = frozenset({"call_id", "status"})
_SLOTS = struct.Struct(f">{len(FINGERPRINT_FIELDS)}I")
ABSENT = 0  # digest of a missing or null field
_SORTED = orjson.OPT_SORT_KEYS


def field_digest(value: Any) -> int:
    """CRC-32 of the canonical JSON of a field value; 0 means absent/null."""
    if value is None:
        return ABSENT
    digest = zlib.crc32(orjson.dumps(value, option=_SORTED))
    # Keep 0 reserved for "absent".
    return digest or 1


# Not frozen: a first scan builds one per call, and a frozen dataclass costs three
# times as much to build (treated as a value all the same: never changed once built).
@dataclass(slots=True)
class Fingerprint:
    """Digests of every field but call_id and status."""

    known: tuple[int, ...]
    extra: tuple[tuple[str, int], ...] = ()

    @classmethod
    def of(cls, item: Mapping[str, Any]) -> Fingerprint:
        get, dumps, crc = item.get, orjson.dumps, zlib.crc32
        # `field_digest` inlined (a call per field is a fifth of a first scan's diff).
        known = tuple(
            [
                ABSENT if (v := get(name)) is None else (crc(dumps(v, option=_SORTED)) or 1)
                for name in FINGERPRINT_FIELDS
            ]
        )
        others = item.keys() - _NAMED
        if not others:  # the documented fields only: the common case
            return cls(known)
        return cls(known, tuple(sorted((k, field_digest(item[k])) for k in others)))

    def as_dict(self) -> dict[str, int]:
        out = dict(zip(FINGERPRINT_FIELDS, self.known, strict=True))
        out.update(self.extra)
        return out

    def encode(self) -> str:
        """Compact text form: base64 of the fixed slots, then ``;name=digest`` extras.

        Extra field names come from the platform and may hold any character: they
        are percent-encoded, so ``;``, ``=`` and ``|`` never appear unescaped.
        """
        head = binascii.b2a_base64(_SLOTS.pack(*self.known), newline=False).decode()
        if not self.extra:
            return head.rstrip("=")
        tail = "".join(f";{quote(k, safe='')}={d:x}" for k, d in self.extra)
        return head.rstrip("=") + tail

    @classmethod
    def decode(cls, text: str, *, escaped: bool = True) -> Fingerprint:
        """Parse `encode`'s form; ``escaped=False`` reads schema 1 (names written raw)."""
        head, *extras = text.split(";")
        try:
            raw = binascii.a2b_base64(head + "=" * (-len(head) % 4), strict_mode=True)
        except binascii.Error as exc:
            raise ValueError(f"fingerprint is not base64: {exc}") from None
        if len(raw) != _SLOTS.size:
            raise ValueError("fingerprint has the wrong number of fields")
        known = _SLOTS.unpack(raw)
        if not extras:
            return cls(known)
        extra = []
        for part in extras:
            name, _, digest = part.rpartition("=")
            extra.append((unquote(name) if escaped else name, int(digest, 16)))
        return cls(tuple(known), tuple(extra))


_KNOWN_SET = frozenset(FINGERPRINT_FIELDS)
# Fields with a fixed slot or not fingerprinted at all; any other one is an extra.
_NAMED = _KNOWN_SET | _NOT_FINGERPRINTED


# Not frozen: a first scan builds one per call, and a frozen dataclass costs three
# times as much to build (treated as a value all the same: never changed once built).
@dataclass(slots=True)
class CallState:
    """What the bridge last observed of one call."""

    status: str
    seq: int
    fingerprint: Fingerprint

    def encode(self) -> str:
        """Schema 2: ``v2|seq|fingerprint|status``.

        The status goes last: an unknown status string may contain anything.
        """
        return f"v2|{self.seq}|{self.fingerprint.encode()}|{self.status}"

    @classmethod
    def decode(cls, text: str | bytes) -> CallState:
        """Reads schema 2 and schema 1 (``seq|fingerprint|status``, raw field names),
        so replicas of the previous release and this one share a snapshot."""
        if isinstance(text, bytes):
            text = text.decode()
        if text.startswith("v2|"):
            seq, fp, status = text[3:].split("|", 2)
            return cls(status=status, seq=int(seq), fingerprint=Fingerprint.decode(fp))
        seq, fp, status = text.split("|", 2)
        return cls(status=status, seq=int(seq), fingerprint=Fingerprint.decode(fp, escaped=False))


class CallStates(Mapping[str, CallState]):
    """The call states of a batch, kept in their stored (encoded) form.

    A replica keeps every call of the batches it polls in memory; as strings they
    cost less memory and, unlike objects, nothing to the garbage collector's full
    passes (which once took a fifth of a cycle). A state is decoded when it is read,
    which the poller does only for the calls that changed. An entry that cannot be
    decoded (written by something else) reads as absent: the call is seen afresh.
    """

    __slots__ = ("_encoded", "_status", "unreadable")

    def __init__(self, encoded: dict[str, str] | None = None) -> None:
        self._encoded: dict[str, str] = encoded if encoded is not None else {}
        # Each call's status too, parsed once: the active plan asks for the status of
        # every call of the batch each cycle (a shared string per status: cheap).
        self._status: dict[str, str] = {c: _status_of(t) for c, t in self._encoded.items()}
        self.unreadable = 0

    def __getitem__(self, call_id: str) -> CallState:
        text = self._encoded[call_id]
        try:
            return CallState.decode(text)
        except ValueError:
            self.unreadable += 1
            raise KeyError(call_id) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._encoded)

    def __len__(self) -> int:
        return len(self._encoded)

    def __contains__(self, call_id: object) -> bool:
        return call_id in self._encoded

    def get(self, call_id: str, default: CallState | None = None) -> CallState | None:  # type: ignore[override]
        # Mapping.get goes through a KeyError per unknown call: a first scan of a
        # batch asks for every call, and the exceptions cost more than the rest.
        if call_id not in self._encoded:
            return default
        try:
            return self[call_id]
        except KeyError:
            return default

    def status(self, call_id: str) -> str | None:
        """The call's status without decoding the rest (None when unknown)."""
        return self._status.get(call_id)

    def update(self, states: Mapping[str, CallState], encoded: Mapping[str, str]) -> None:
        """Take `states` (a commit's), whose encoded forms are `encoded`."""
        self._encoded.update(encoded)
        status = self._status
        for call_id, state in states.items():
            status[call_id] = state.status


# One string object per status however many calls hold it.
_STATUSES: dict[str, str] = {}


def _status_of(text: str) -> str:
    """The status of an encoded state (both schemas), without decoding the rest."""
    status = text.split("|", 3 if text.startswith("v2|") else 2)[-1]
    return _STATUSES.setdefault(status, status) if len(_STATUSES) < 256 else status
