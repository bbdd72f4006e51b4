"""Training windows in a deterministic, resumable order; fixed eval windows.

A window is `seq_len + 1` consecutive tokens (inputs plus the next-token targets). The training
stream is cut into non-overlapping windows; each epoch visits all of them in an order drawn from
`numpy.random.default_rng([seed, epoch])`, so the order depends on the seed alone and the
position (epoch, index) is all a checkpoint needs to continue exactly.
"""
from __future__ import annotations

import numpy as np

from data.corpus import DataError


def _windows(tokens: np.ndarray, window: int, what: str) -> np.ndarray:
    count = len(tokens) // window
    if count == 0:
        raise DataError(f"the {what} stream has {len(tokens)} tokens, fewer than one window of {window} (trainer.seq_len + 1)")
    return np.lib.stride_tricks.as_strided(tokens, shape=(count, window), strides=(tokens.strides[0] * window, tokens.strides[0]))


class WindowSampler:
    def __init__(self, tokens: np.ndarray, window: int, seed: int):
        self.windows = _windows(tokens, window, "training")
        self.window = window
        self.seed = seed
        self.epoch = 0
        self.index = 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.windows))

    def next_batch(self, batch_size: int) -> np.ndarray:
        """[batch_size, window] int64 token ids; crosses epoch boundaries as needed."""
        picked = []
        need = batch_size
        while need:
            take = min(need, len(self._order) - self.index)
            picked.append(self._order[self.index:self.index + take])
            self.index += take
            need -= take
            if self.index == len(self._order):
                self.epoch += 1
                self.index = 0
                self._order = self._epoch_order(self.epoch)
        return self.windows[np.concatenate(picked)].astype(np.int64)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed,
                "window": self.window, "num_windows": len(self.windows)}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "window", "num_windows"):
            if state.get(key) != mine[key]:
                raise DataError(
                    f"data position in the checkpoint has {key}={state.get(key)}, but this run has {mine[key]}: "
                    "the data, trainer.seq_len or seed changed since the checkpoint was written"
                )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._epoch_order(self.epoch)


def eval_windows(tokens: np.ndarray, window: int, num_batches: int, batch_size: int) -> list[np.ndarray]:
    """`num_batches` fixed batches of windows spread evenly over the eval stream (repeats when
    the stream holds fewer windows than asked for)."""
    windows = _windows(tokens, window, "eval")
    picks = np.linspace(0, len(windows) - 1, num_batches * batch_size).round().astype(np.int64)
    return [windows[p].astype(np.int64) for p in picks.reshape(num_batches, batch_size)]
