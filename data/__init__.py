"""Pretraining data: token streams from text files, a token file or the stdlib; resumable order."""
from data.config import DataConfig
from data.corpus import DataError, TokenCorpus, load_corpus
from data.sampler import WindowSampler, eval_windows

__all__ = ["DataConfig", "DataError", "TokenCorpus", "load_corpus", "WindowSampler", "eval_windows"]
