"""The hash chain: every stored record's SHA-256 covers the previous record's hash.

One sequence number space runs through both tables (``pulses`` and ``records``), so the chain is
one line: ``hash[n] = SHA-256(hash[n-1] || canonical(record n))`` with ``hash[0]`` all zeros. The
canonical encoding covers every column but the hash itself, including ``seq``, so an edit, a
deletion, an insertion or a swap of any two rows breaks the chain at the first changed place.
The head (last seq and hash) is kept in ``chain_head``, updated in the same transaction, so that
deleting the last rows is detected too.

Encodings, chosen to be cheap enough for 50,000 pulses/s in Python:

    pulse   b"P" | seq i64 | session i64 | pulse_no i64 | t_us i64 | host_ns i64 | energy_uj i64
                 | zone utf-8                                          (integers little-endian)
    record  b"R" | seq i64 | session i64 (-1 = none) | at_ns i64 | kind utf-8 | 0x00 | body utf-8

Both end with their only unbounded field. The encoding is one-to-one over the values the writer
stores, and the verifier (:mod:`devicectl.sessionlog.verify`) refuses any other stored value before
hashing, so no edit yields a different row with the same encoding:

- a record's session is NULL or a session id, and the writer refuses ids below 1, so -1 stands
  only for NULL: a stored session_id below 1 is an alteration. (The sentinel is kept rather than
  versioned so that logs written earlier still verify; a version marker would be stored data too,
  which an attacker could set back to the old encoding.)
- integers are SQLite integers (i64), text is UTF-8 text, hashes are blobs: a value stored with
  another type (possible only once the STRICT tables are rewritten) is an alteration, never
  coerced.
- the kind and body the writer stores hold no NUL (kinds are fixed names, bodies canonical JSON,
  which escapes it), so a record's encoding holds one 0x00: moving bytes between kind and body
  changes the encoding.
"""

from __future__ import annotations

import struct
from hashlib import sha256

__all__ = ["GENESIS", "MIN_SESSION_ID", "pulse_hash", "record_hash"]

GENESIS = bytes(32)
MIN_SESSION_ID = 1  # the first session's id; anything lower is never stored (see above)
_NO_SESSION = -1
_PULSE = struct.Struct("<cqqqqqq")
_RECORD = struct.Struct("<cqqq")


def pulse_hash(
    prev: bytes,
    seq: int,
    session_id: int,
    pulse_no: int,
    t_us: int,
    host_ns: int,
    energy_uj: int,
    zone: str,
) -> bytes:
    data = _PULSE.pack(b"P", seq, session_id, pulse_no, t_us, host_ns, energy_uj)
    return sha256(prev + data + zone.encode()).digest()


def record_hash(
    prev: bytes, seq: int, session_id: int | None, at_ns: int, kind: str, body: str
) -> bytes:
    head = _RECORD.pack(b"R", seq, _NO_SESSION if session_id is None else session_id, at_ns)
    return sha256(prev + head + kind.encode() + b"\x00" + body.encode()).digest()
