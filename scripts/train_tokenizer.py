"""Trains the shipped byte-level BPE tokenizer on the sample SFT text, reproducibly.

The vocabulary is exactly --vocab-size entries (the tiny model's embedding rows), the chat
template's markers first (so BOS=0, EOS=1, pad=2 as in the DeepSeek-V4 release), then the 256
byte symbols, then merges. Digits are split one per token: the arithmetic tasks are learnt digit by
digit, which a ~1M-parameter model manages and multi-digit tokens would make much harder.

    python scripts/train_tokenizer.py [--data 'data/sample/sft_train.jsonl'] [--out data/sample/tokenizer.json]
"""

import argparse
import glob
import json
import os
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.chat_template import get_template  # noqa: E402
from data.formats import parse_sft  # noqa: E402


def texts(pattern: str):
    """Every message text of the SFT files, in file and line order (the order fixes the merges)."""
    for path in sorted(glob.glob(pattern)):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    record = parse_sft(json.loads(line))
                    yield from (m.content for m in record.messages)


def train(pattern: str, vocab_size: int, special_tokens: tuple[str, ...]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts(pattern), trainer=trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise SystemExit(f"the corpus supports only {tokenizer.get_vocab_size()} tokens, not {vocab_size}")
    return tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join("data", "sample", "sft_train.jsonl"))
    parser.add_argument("--out", default=os.path.join("data", "sample", "tokenizer.json"))
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--template", default="deepseek_v4", help="whose special tokens to reserve")
    args = parser.parse_args(argv)
    tokenizer = train(args.data, args.vocab_size, get_template(args.template).special_tokens)
    tokenizer.save(args.out)
    print(f"wrote {args.out}: {tokenizer.get_vocab_size()} tokens")


if __name__ == "__main__":
    main()
