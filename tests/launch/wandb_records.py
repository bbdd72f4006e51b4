"""Read the history of an offline wandb run from its .wandb file (LevelDB-style log of protobuf
records after a 7-byte ':W&B' header), so tests can check what was logged without a server."""
from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7


def _records(data: bytes):
    pos, pending = HEADER, b""
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:  # block trailer padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
            pending = b""


def wandb_history(run_dir: Path) -> list[dict]:
    """Every logged row of every offline run under run_dir/wandb, as {key: value} dicts."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for path in sorted(Path(run_dir).glob("wandb/offline-run-*/*.wandb")):
        for raw in _records(path.read_bytes()):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            if record.WhichOneof("record_type") == "history":
                rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                             for item in record.history.item})
    return rows
