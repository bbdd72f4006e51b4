"""N:M in the backward pass: the masks that sparsify the input-gradient GEMM (the autograd
Function that uses a different weight there than in the forward is masked_forward.InputGradMasked).

A linear layer y = x W^T (W [out, in], N:M groups along `in`) costs three GEMMs per step: the
forward x W^T, the input gradient dL/dx = g W and the weight gradient dL/dW = g^T x. Forward N:M
sparsifies only the first. `sparsity.backward` (SparsityConfig) chooses what the second uses:

- exact: autograd through the forward-masked weight, dL/dx = g (W . M_f). W . M_f is N:M along
  `in`, which is the reduction dimension of the forward GEMM but not of g W (there the reduction
  runs along `out`), so the input-gradient GEMM gets no structured speed-up.
- bidirectional (Bi-Mask, Zhang et al. 2023; code zyxxmu/Bi-Mask, conv_type.py): the input
  gradient uses dL/dx = g (W . M_b) with M_b = M_f AND (the N largest |W . M_f| in every group
  of M consecutive weights along `out`, after a row permutation of `out`). The permutation is the
  best of `sparsity.backward_permutations` random ones by the number of weights M_b keeps,
  searched again every `sparsity.backward_permutation_interval` steps (the reference's
  greedy_num=10, iter=100). M_b is N:M (at most N per group) along `out` in that permuted order:
  a kernel permutes the columns of g the same way, which costs nothing in the GEMM. Where the
  reference is silent or differs: it tries only random permutations; we try the identity first
  as well, so more candidates never keep fewer weights than no permutation. Its seed is the
  global numpy RNG; ours is sparsity.seed, the step and the layer's index, the same on every rank.
- transposable (Hubara et al. 2021, "Accelerated Sparse Neural Training: A Provable and
  Efficient Method to Find N:M Transposable Masks"): one mask M_t with N non-zeros in every row
  and every column of each M x M block, so W . M_t and its transpose are both N:M; forward and
  input gradient use the same W . M_t (plain autograd). M_t maximises sum |W . M_t| per block:
  exactly, by enumerating every admissible M x M pattern, for M <= EXACT_MAX_M (90 patterns at
  2:4), else greedily (entries by decreasing |w|, taken while their row and column have fewer than
  N; a 1/2-approximation of the optimum, the paper's "2-approximation" greedy, which can leave a
  row short of N). The paper recomputes it every ~40 iterations; we recompute it whenever the
  forward mask is recomputed (`sparsity.mask_interval`), so it always is the forward mask.

In all three the weight gradient stays dense, dL/dW = g^T x passed straight through the mask
(STE, plus SR-STE as configured), as in both papers; BDWP (arXiv 2309.13015) prunes the same two
GEMMs and also keeps the weight-gradient GEMM dense.
"""
from __future__ import annotations

import itertools
from functools import lru_cache

import torch

# Exact enumeration up to 5 x 5 blocks (at most 2040 patterns, at 2:5 and 3:5); greedy above
# (8 x 8 at 2:8 already has 187,530,840 patterns).
EXACT_MAX_M = 5


@lru_cache(maxsize=None)
def transposable_patterns(n: int, m: int) -> torch.Tensor:
    """Every m x m 0/1 matrix with exactly n ones in each row and each column, as a bool tensor
    [K, m, m], in a fixed (lexicographic by rows) order: the candidates of the exact search."""
    rows = [c for c in itertools.combinations(range(m), n)]
    found: list[list[tuple[int, ...]]] = []

    def extend(chosen: list[tuple[int, ...]], col_counts: list[int]) -> None:
        left = m - len(chosen)
        if left == 0:
            found.append(list(chosen))
            return
        for row in rows:
            counts = list(col_counts)
            for c in row:
                counts[c] += 1
            # every column still needs n - count ones from the `left - 1` rows after this one
            if all(n - k <= left - 1 and k <= n for k in counts):
                chosen.append(row)
                extend(chosen, counts)
                chosen.pop()

    extend([], [0] * m)
    out = torch.zeros(len(found), m, m, dtype=torch.bool)
    for k, pattern in enumerate(found):
        for r, cols in enumerate(pattern):
            out[k, r, list(cols)] = True
    return out


def _blocks(weight: torch.Tensor, m: int) -> torch.Tensor:
    """[R, C] -> [R/m * C/m, m, m], block (i, j) at index i * C/m + j."""
    r, c = weight.shape
    return weight.reshape(r // m, m, c // m, m).permute(0, 2, 1, 3).reshape(-1, m, m)


def _unblocks(blocks: torch.Tensor, shape: tuple[int, int], m: int) -> torch.Tensor:
    r, c = shape
    return blocks.reshape(r // m, c // m, m, m).permute(0, 2, 1, 3).reshape(r, c)


def transposable_mask(weight: torch.Tensor, n: int, m: int, algorithm: str = "auto",
                      chunk: int = 1 << 16) -> torch.Tensor:
    """Bool mask with at most n non-zeros in every row and column of each m x m block of the 2-D
    `weight` (exactly n for the exact search), maximising the kept sum of |w| per block.

    algorithm: exact (enumerate transposable_patterns; ties go to the pattern first in their
    order), greedy (see the module docstring), auto (exact for m <= EXACT_MAX_M)."""
    if weight.dim() != 2 or weight.shape[0] % m or weight.shape[1] % m:
        raise ValueError(f"transposable {n}:{m} mask needs a 2-D weight with both dims divisible by {m}, "
                         f"got shape {tuple(weight.shape)}")
    if algorithm == "auto":
        algorithm = "exact" if m <= EXACT_MAX_M else "greedy"
    blocks = _blocks(weight.detach().abs().float(), m)
    if algorithm == "exact":
        patterns = transposable_patterns(n, m).to(weight.device)
        flat = patterns.reshape(len(patterns), m * m).float()
        picks = []
        for start in range(0, blocks.shape[0], chunk):  # bounds the [blocks, patterns] score matrix
            scores = blocks[start:start + chunk].reshape(-1, m * m) @ flat.t()
            picks.append(scores.argmax(dim=1))
        chosen = patterns[torch.cat(picks)]
    elif algorithm == "greedy":
        chosen = _greedy(blocks, n, m)
    else:
        raise ValueError(f"transposable mask algorithm {algorithm!r}; expected auto|exact|greedy")
    return _unblocks(chosen, (weight.shape[0], weight.shape[1]), m)


def _greedy(blocks: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per block: visit entries by decreasing |w| (ties: lower row-major index first) and keep one
    while its row and its column hold fewer than n kept entries."""
    count = blocks.shape[0]
    flat = blocks.reshape(count, m * m)
    # float32 bits of a non-negative value order like the value; the position term breaks ties
    key = flat.view(torch.int32).long() * (m * m) + torch.arange(m * m - 1, -1, -1, device=flat.device)
    order = key.argsort(dim=1, descending=True)
    mask = torch.zeros(count, m * m, dtype=torch.bool, device=flat.device)
    row_count = torch.zeros(count, m, dtype=torch.long, device=flat.device)
    col_count = torch.zeros(count, m, dtype=torch.long, device=flat.device)
    index = torch.arange(count, device=flat.device)
    for k in range(m * m):
        pos = order[:, k]
        r, c = pos // m, pos % m
        take = (row_count[index, r] < n) & (col_count[index, c] < n)
        mask[index, pos] = take
        row_count[index, r] += take.long()
        col_count[index, c] += take.long()
    return mask.reshape(count, m, m)


def bidirectional_mask(weight: torch.Tensor, forward_mask: torch.Tensor, n: int, m: int,
                       output_dim: int, permutation: torch.Tensor | None = None) -> torch.Tensor:
    """Bi-Mask's backward mask: forward_mask AND the n largest |W . M_f| of every m consecutive
    weights along `output_dim` taken in `permutation` order (None: the stored order)."""
    from trainer.sparsity.nm import nm_mask  # here: nm.py imports this module

    kept = weight.detach().float() * forward_mask
    if permutation is None:
        return nm_mask(kept, n, m, output_dim) & forward_mask
    permutation = permutation.to(weight.device)
    in_order = nm_mask(kept.index_select(output_dim, permutation), n, m, output_dim)
    backward = torch.empty_like(in_order).index_copy_(output_dim, permutation, in_order)
    return backward & forward_mask


def best_permutation(weight: torch.Tensor, forward_mask: torch.Tensor, n: int, m: int, output_dim: int,
                     candidates: int, generator: torch.Generator) -> torch.Tensor:
    """The permutation of `output_dim` (the identity, then `candidates` random ones drawn from
    `generator`) whose bidirectional_mask keeps the most weights; the first such on ties."""
    size = weight.shape[output_dim]
    best = torch.arange(size)
    best_kept = int(bidirectional_mask(weight, forward_mask, n, m, output_dim, best).sum())
    for _ in range(candidates):
        perm = torch.randperm(size, generator=generator)
        kept = int(bidirectional_mask(weight, forward_mask, n, m, output_dim, perm).sum())
        if kept > best_kept:
            best, best_kept = perm, kept
    return best
