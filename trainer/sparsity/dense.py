"""method=dense: no weight is sparsified; every hook is a no-op (the baseline)."""
from __future__ import annotations

from typing import Any

from trainer.sparsity.base import Sparsifier


class DenseSparsifier(Sparsifier):
    method = "dense"

    def pattern(self, layer) -> dict[str, Any]:  # never called: no layers
        return {"kind": "dense"}
