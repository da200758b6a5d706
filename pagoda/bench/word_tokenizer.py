"""A word-level tokenizer for random-weight models that come without one.

Token i is the word `w<i>` (the model's BOS/EOS ids get `<s>`/`</s>`), words are split on
whitespace, and decoding joins them with spaces, so any sequence of ordinary ids round-trips
exactly through text. With it a dummy 8B checkpoint serves text over the whole OpenAI API,
and text benchmarks build prompts of exact lengths.

    python -m pagoda.bench.word_tokenizer CONFIG_DIR OUT_DIR
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} "
                 "{% endfor %}{% if add_generation_prompt %}assistant {% endif %}")


def word_vocab(vocab_size: int, bos_id: int | None, eos_ids: list[int]) -> dict[str, int]:
    names = {0: UNK}
    if bos_id is not None:
        names[bos_id] = BOS
    for i, eos in enumerate(eos_ids):
        names[eos] = EOS if i == 0 else f"</s{i}>"
    return {names.get(i, f"w{i}"): i for i in range(vocab_size)}


def write_word_tokenizer(directory: Path, vocab_size: int, bos_id: int | None = None,
                         eos_ids: list[int] | None = None) -> Path:
    """tokenizer.json and tokenizer_config.json for a `vocab_size` word vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    eos_ids = eos_ids or []
    vocab = word_vocab(vocab_size, bos_id, eos_ids)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins with spaces
    specials = [name for name, i in vocab.items() if name.startswith("<")]
    tokenizer.add_special_tokens([AddedToken(name, special=True) for name in specials])
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": UNK,
              "bos_token": BOS if bos_id is not None else None,
              "eos_token": EOS if eos_ids else None, "chat_template": CHAT_TEMPLATE,
              "model_max_length": 1 << 20}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory


def with_word_tokenizer(config_dir: Path, out_dir: Path) -> Path:
    """A copy of a config-only checkpoint directory, plus a word tokenizer sized to it."""
    config = json.loads((config_dir / "config.json").read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(config_dir / "config.json", out_dir / "config.json")
    eos = config.get("eos_token_id")
    eos_ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    return write_word_tokenizer(out_dir, config["vocab_size"], config.get("bos_token_id"),
                                eos_ids)


if __name__ == "__main__":
    print(with_word_tokenizer(Path(sys.argv[1]), Path(sys.argv[2])))
