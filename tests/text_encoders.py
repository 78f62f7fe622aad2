"""A tiny random BERT saved as a local model folder, for the title-encoder tests (no
download: the config, a character WordPiece vocabulary and random weights are made here)."""

from __future__ import annotations

import string
from pathlib import Path

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_bert(folder: Path, seed: int = 0) -> Path:
    """Hidden 32, 2 layers; every lowercase letter and digit is a word piece on its own and
    as a continuation (##x), so any title tokenises into characters."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits
    vocab = [*SPECIAL, *chars, *(f"##{c}" for c in chars)]
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(vocab_file), model_max_length=64)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
