"""Tiny random-init Hugging Face causal LMs saved with `save_pretrained`, for tests. No downloads.

Import from any test as a plain module (tests/ is on sys.path through tests/conftest.py):

    from hf_fixtures import save_tiny_llama, save_tiny_gpt2
    path = save_tiny_llama(tmp_path / "llama")          # config.json + model.safetensors + tokenizer
    cfg = ModelConfig(kind="hf", path=str(path))

- `save_tiny_llama`: Llama-style, grouped-query attention (4 query heads, 2 key/value heads),
  RMSNorm, SwiGLU MLP, untied lm_head. ~0.1 M parameters.
- `save_tiny_gpt2`: GPT-2 style, tied embeddings (lm_head.weight is transformer.wte.weight),
  Conv1D projections (weight [in, out]). ~0.1 M parameters.
- `save_tiny_qwen2`: Qwen2-style: grouped-query attention AND tied embeddings, q/k/v biases.
- `save_tiny_tokenizer`: a byte-level BPE trained offline on generated text, with BOS/EOS/PAD
  and (optionally) a small chat template, saved as a PreTrainedTokenizerFast.

Each takes `with_tokenizer`; without it the directory has no tokenizer files and the loader
falls back to the byte tokenizer, so the model vocabulary is then sized for it (259).
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

TINY_VOCAB = 384  # byte-level BPE: 256 bytes + 3 specials + 125 merges
BYTE_VOCAB = 259  # models.tokenizer.ByteTokenizer.vocab_size

# A minimal chat template (ChatML-like) so apply_chat_template has something to apply.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_WORDS = (
    "the a sparse model trains on tokens with two of four weights kept zero while rollouts "
    "sample answers and the trainer publishes deltas to every worker add one two three four five "
    "six seven eight nine ten plus minus equals question answer"
).split()


def _corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12)))
        lines.append(f"{words}. {a} + {b} = {a + b}")
    return lines


def save_tiny_tokenizer(out_dir: str | Path, vocab_size: int = TINY_VOCAB, chat_template: bool = True):
    """Train a byte-level BPE of exactly `vocab_size` tokens (including the specials <s>, </s>,
    <pad> and, with a chat template, <|im_start|>/<|im_end|>) and save it into `out_dir`.
    Returns the PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<pad>"] + (["<|im_start|>", "<|im_end|>"] if chat_template else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:  # the corpus must be rich enough to reach the size
        raise RuntimeError(f"tiny tokenizer reached {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        chat_template=CHAT_TEMPLATE if chat_template else None,
    )
    fast.save_pretrained(str(out_dir))
    return fast


def save_tiny_llama(
    out_dir: str | Path, with_tokenizer: bool = True, chat_template: bool = True, seed: int = 0,
    hidden_size: int = 64, num_hidden_layers: int = 2, num_attention_heads: int = 4,
    num_key_value_heads: int = 2, intermediate_size: int = 128,
) -> Path:
    """A Llama-style causal LM with grouped-query attention, saved into `out_dir`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    vocab = TINY_VOCAB if with_tokenizer else BYTE_VOCAB
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=0 if with_tokenizer else 256,
        eos_token_id=1 if with_tokenizer else 257, pad_token_id=2 if with_tokenizer else 258,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(out_dir))
    if with_tokenizer:
        save_tiny_tokenizer(out_dir, chat_template=chat_template)
    return out_dir


def save_tiny_gpt2(
    out_dir: str | Path, with_tokenizer: bool = True, chat_template: bool = False, seed: int = 0,
    n_embd: int = 64, n_layer: int = 2, n_head: int = 4, n_positions: int = 256,
) -> Path:
    """A GPT-2 style causal LM (tied embeddings, Conv1D projections), saved into `out_dir`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    out_dir = Path(out_dir)
    vocab = TINY_VOCAB if with_tokenizer else BYTE_VOCAB
    config = GPT2Config(
        vocab_size=vocab, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=n_positions,
        tie_word_embeddings=True, bos_token_id=0 if with_tokenizer else 256,
        eos_token_id=1 if with_tokenizer else 257, pad_token_id=2 if with_tokenizer else 258,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(str(out_dir))
    if with_tokenizer:
        save_tiny_tokenizer(out_dir, chat_template=chat_template)
    return out_dir


def save_tiny_qwen2(out_dir: str | Path, with_tokenizer: bool = True, seed: int = 0,
                    num_attention_heads: int = 4, num_key_value_heads: int = 2) -> Path:
    """A Qwen2-style causal LM (GQA, tied embeddings, q/k/v biases), saved into `out_dir`.
    Its vocabulary is padded beyond the tokenizer (as Qwen's is): transformers' Qwen2Tokenizer
    adds one token of its own to the trained ones."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    config = Qwen2Config(
        vocab_size=TINY_VOCAB + 16 if with_tokenizer else BYTE_VOCAB, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
        max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=0 if with_tokenizer else 256,
        eos_token_id=1 if with_tokenizer else 257, pad_token_id=2 if with_tokenizer else 258,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(str(out_dir))
    if with_tokenizer:
        save_tiny_tokenizer(out_dir, chat_template=True)
    return out_dir
