"""What of a patient may leave the device: a keyed pseudonym of the reference, or nothing.

The session log on the device keeps the clinic's patient reference (it is the patient file). What
goes out over MQTT is, by the ``[privacy]`` settings (docs/mqtt.md, "Patient data"):

- ``patient_key_secret`` set: :func:`patient_key`, HMAC-SHA-256 of the reference keyed with the
  site's secret, as 64 lower-case hex characters. The devices of one site share the secret, so a
  fleet recorder links one patient's course across devices without ever seeing the reference;
  without the secret the pseudonym cannot be reversed or recomputed from a guessed reference;
- no secret: nothing (``null``);
- ``publish_patient_ref = true``: the reference itself, an explicit choice with its consequence
  documented (anyone who can read the broker reads the clinic's references).
"""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["patient_key", "published_patient"]


def patient_key(secret: str, ref: str) -> str:
    """``hex(HMAC-SHA-256(key = secret's UTF-8 bytes, msg = ref's UTF-8 bytes))``: 64 lower-case
    hex characters. The wire agreement with the fleet recorder: change it and courses no longer
    link across devices."""
    return hmac.new(secret.encode(), ref.encode(), hashlib.sha256).hexdigest()


def published_patient(ref: str, *, secret: str | None, publish_ref: bool) -> str | None:
    """The ``patient`` field of MQTT payloads for ``ref`` under the privacy settings."""
    if publish_ref:
        return ref
    if secret:
        return patient_key(secret, ref)
    return None
