"""A Hugging Face tokenizer behind models/tokenizer.py's Tokenizer interface, and the choice of
tokenizer for an HF model directory (its own when it has one, the byte tokenizer otherwise).

Conventions match ByteTokenizer so data and rollout code need not know which one they hold:
- `encode(text)` adds no special tokens (callers prepend `bos_id` / append `eos_id` themselves);
  special-token text inside `text` (e.g. "<|im_start|>") still maps to its special id.
- `decode(ids)` drops special tokens and ids outside the tokenizer (a model's embedding table
  may be padded beyond the tokenizer).
- `bos_id`: the tokenizer's BOS; when it has none (GPT-2 uses one token for both, Qwen has
  none), the EOS id. `pad_id`: the tokenizer's PAD, else EOS. Padding is always described by
  attention masks, never by comparing ids with `pad_id` (it may equal `eos_id`).
- `apply_chat_template(prompt)` returns the prompt text with the chat template applied (a user
  turn plus the generation prompt), or the prompt unchanged when there is no template.
"""
from __future__ import annotations

from pathlib import Path

from models.build import ModelConfigError
from models.tokenizer import ByteTokenizer, Tokenizer

# Files whose presence means "this directory ships its own tokenizer".
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class HFTokenizer:
    """Adapter from a transformers tokenizer to the Tokenizer interface (see module docstring)."""

    def __init__(self, hf_tokenizer, name: str = "tokenizer"):
        self.hf = hf_tokenizer
        self.vocab_size: int = len(hf_tokenizer)
        eos = hf_tokenizer.eos_token_id
        if eos is None:
            raise ModelConfigError(f"{name}: the tokenizer has no eos_token; generation could never stop")
        self.eos_id: int = int(eos)
        bos = hf_tokenizer.bos_token_id
        self.bos_id: int = int(eos if bos is None else bos)
        pad = hf_tokenizer.pad_token_id
        self.pad_id: int = int(eos if pad is None else pad)
        self.has_chat_template: bool = bool(getattr(hf_tokenizer, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        return self.hf.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, prompt: str | list[dict]) -> str:
        """Prompt text with the chat template applied (a str is one user turn), ending with the
        assistant generation prompt; the prompt unchanged when the tokenizer has no template."""
        if not self.has_chat_template:
            if isinstance(prompt, str):
                return prompt
            raise ModelConfigError("the tokenizer has no chat template; pass the prompt as plain text")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Token ids of an RL prompt for any Tokenizer: through the chat template when there is one
    (the template decides about BOS), else `[bos_id] + encode(prompt)`."""
    if isinstance(tokenizer, HFTokenizer) and tokenizer.has_chat_template:
        return tokenizer.encode(tokenizer.apply_chat_template(prompt))
    return [tokenizer.bos_id] + tokenizer.encode(prompt)


def has_tokenizer_files(path: str | Path) -> bool:
    return any((Path(path) / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(path: str | Path, model_vocab_size: int) -> Tokenizer:
    """The directory's own tokenizer (HFTokenizer) when it has tokenizer files, else the byte
    tokenizer. Raises ModelConfigError when the tokenizer cannot be read or has more ids than
    the model's vocabulary (`model_vocab_size`, config.vocab_size) can embed."""
    if has_tokenizer_files(path):
        from transformers import AutoTokenizer

        try:
            hf_tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        except Exception as e:  # never fall back to bytes silently when the model ships a tokenizer
            raise ModelConfigError(f"model.path={str(path)!r}: tokenizer files could not be loaded: {e}") from e
        tok: Tokenizer = HFTokenizer(hf_tok, name=f"model.path={str(path)!r}")
        what = "its tokenizer"
    else:
        tok = ByteTokenizer()
        what = "the byte tokenizer (the directory has no tokenizer files)"
    if tok.vocab_size > model_vocab_size:
        raise ModelConfigError(
            f"model.path={str(path)!r}: {what} has {tok.vocab_size} ids but the model's vocab_size "
            f"is {model_vocab_size}; token ids would fall outside the embedding table"
        )
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the one the `tokenizers` ByteLevel steps use."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


BYTE_SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")  # ids 256, 257, 258 as in ByteTokenizer


def save_byte_tokenizer_as_hf(out_dir: str | Path):
    """Write the byte tokenizer as HF tokenizer files (a byte-level BPE without merges: byte b
    is id b, then <|bos|>=256, <|eos|>=257, <|pad|>=258), so an exported built-in model loads
    with AutoTokenizer and encodes exactly as ByteTokenizer. Returns the PreTrainedTokenizerFast."""
    from tokenizers import AddedToken, Tokenizer as RawTokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    base = ByteTokenizer()
    for tok_id, text in zip((base.bos_id, base.eos_id, base.pad_id), BYTE_SPECIAL_TOKENS):
        vocab[text] = tok_id
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BYTE_SPECIAL_TOKENS])
    bos, eos, pad = BYTE_SPECIAL_TOKENS
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=bos, eos_token=eos, pad_token=pad)
    fast.save_pretrained(str(out_dir))
    return fast
