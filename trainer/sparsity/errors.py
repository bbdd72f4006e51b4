"""Typed errors of the sparsity component."""
from __future__ import annotations


class SparsityConfigError(ValueError):
    """A sparsity config that cannot work for this model; the message names the field or layer."""


class SparsityPatternError(ValueError):
    """A sparsified weight that violates its pattern (N:M groups, layer density)."""


class SparsityStateError(ValueError):
    """A sparsifier state_dict that does not match this sparsifier (layers, shapes, method)."""
