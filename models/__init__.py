"""Models behind one interface (see models/gpt.py for the call convention)."""
from models.build import ModelConfigError, build_model
from models.config import ModelConfig
from models.gpt import GPT, CausalLMOutput, GPTConfig
from models.sparsity_targets import default_sparsity_targets, match_sparsity_targets
from models.tokenizer import ByteTokenizer, Tokenizer

__all__ = [
    "GPT", "GPTConfig", "CausalLMOutput", "ByteTokenizer", "Tokenizer",
    "ModelConfig", "ModelConfigError", "build_model",
    "default_sparsity_targets", "match_sparsity_targets",
]
