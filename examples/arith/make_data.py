"""Write the examples/arith prompt datasets (and, optionally, a tiny random HF model to run them on).

    python examples/arith/make_data.py                      # train.parquet, eval.parquet (committed)
    python examples/arith/make_data.py --tiny-hf /tmp/tiny  # + a 2-layer Llama with the byte tokenizer

Rows: `prompt` ("37+45="), `answer` ("82") and `difficulty` (digits per operand, 1 or 2).
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent


def rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        difficulty = rng.choice([1, 2])
        lo, hi = (0, 9) if difficulty == 1 else (10, 99)
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        out.append({"prompt": f"{a}+{b}=", "answer": str(a + b), "difficulty": difficulty})
    return out


def write_tiny_hf(out_dir: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from models.hf_tokenizer import save_byte_tokenizer_as_hf

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         bos_token_id=256, eos_token_id=257, pad_token_id=258, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    save_byte_tokenizer_as_hf(out_dir)


def main() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--tiny-hf", type=Path, default=None, help="also write a tiny random Llama here")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows(2000, seed=0)), args.out / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows(64, seed=1)), args.out / "eval.parquet")
    print(f"wrote {args.out / 'train.parquet'} (2000 rows) and {args.out / 'eval.parquet'} (64 rows)")
    if args.tiny_hf is not None:
        write_tiny_hf(args.tiny_hf)
        print(f"wrote a tiny Llama (byte tokenizer) to {args.tiny_hf}")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(HERE.parent.parent))  # models/ from the repository root
    main()
