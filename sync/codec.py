"""The codec's public names in one place: encoder.py writes payloads, decoder.py reads them
(FORMAT.md is the wire format). Kept so `from sync.codec import ...` goes on working."""
from __future__ import annotations

from sync.decoder import DEFAULT_MAX_BYTES, DecodedPayload, apply, decode_into, inspect_payload, plan_payload
from sync.dtypes import tensor_from_bits
from sync.encoder import encode

__all__ = ["encode", "decode_into", "apply", "inspect_payload", "plan_payload", "DecodedPayload",
           "tensor_from_bits", "DEFAULT_MAX_BYTES"]
