"""Rebuild the two small tokenizers shipped in raydc/assets/tokenizers/ (run once; the
outputs are committed). Both are trained on GSM8K train questions and answers.

- tiny-bpe: byte-level BPE, 2,048 tokens (a GPT-2/Qwen-style tokenizer in miniature).
- tiny-wordpiece: a different family on purpose (whitespace pre-tokenizer + WordPiece,
  1,024 tokens, lower-casing off) so cross-tokenizer alignment is tested on genuinely
  different token boundaries.
"""

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "raydc" / "assets"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# A ChatML template (the format Qwen students use); the default system prompt is omitted
# so short test traces stay short.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def corpus():
    for line in (ASSETS / "gsm8k" / "train.jsonl").open():
        row = json.loads(line)
        yield row["question"]
        yield row["answer"]


def save(tok: Tokenizer, name: str) -> None:
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 4096
    out = ASSETS / "tokenizers" / name
    fast.save_pretrained(out)
    print(name, len(fast), "->", out)


def main() -> None:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        corpus(),
        trainers.BpeTrainer(
            vocab_size=2048,
            special_tokens=SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    save(bpe, "tiny-bpe")

    wp = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    wp.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits()]
    )
    wp.decoder = decoders.WordPiece()
    wp.train_from_iterator(
        corpus(),
        trainers.WordPieceTrainer(
            vocab_size=1024, special_tokens=SPECIALS + ["[UNK]"], show_progress=False
        ),
    )
    save(wp, "tiny-wordpiece")


if __name__ == "__main__":
    main()
