"""The tokenizer and chat-template metadata of a GGUF model, read from the base's tokenizer files.

Supported: byte-level BPE tokenizers (`tokenizer.json`, llama.cpp's `gpt2` tokenizer model: GPT-2, Llama 3, Qwen2
and the many models that reuse their pre-tokenizers). llama.cpp picks its pre-tokenizer by name
(`tokenizer.ggml.pre`); the name is read off the tokenizer's own split rule, so a tokenizer trained on other text with
the same rule is recognized. Token types follow llama.cpp's converter (added special tokens are `CONTROL`, other added
tokens `USER_DEFINED`, ids the vocabulary leaves empty `UNUSED`); merges, special token ids, `add_bos_token` and the
chat template come from the `gguf` package's own `SpecialVocab`. SentencePiece tokenizers (`tokenizer.model`, read
with the `sentencepiece` package) become llama.cpp's `llama` tokenizer model: pieces, scores and types, then the
added tokens of `added_tokens.json` and `tokenizer_config.json`, as llama.cpp's converter reads them (it prefers
`tokenizer.model` when both files exist; so does this module).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MergeInputError

__all__ = ["GGUFVocab", "plan_vocab"]

_LETTERS = r"[^\r\n\p{L}\p{N}]?\p{L}+"
_TAIL = r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
# The split rule of a pre-tokenizer -> llama.cpp's name for it.
_PRE_BY_SPLIT = {
    f"{_CONTRACTIONS}|{_LETTERS}|\\p{{N}}{{1,3}}|{_TAIL}": "llama-bpe",
    f"{_CONTRACTIONS}|{_LETTERS}|\\p{{N}}|{_TAIL}": "qwen2",
}
_SPECIAL_LOOKING = ("<pad>", "<mask>", "<2mass>", "[@BOS@]")


@dataclass
class GGUFVocab:
    """The tokenizer of a GGUF file: what `add_to` writes.

    Args:
        folder (`Path`): The folder of the tokenizer files.
        pre (`str`): llama.cpp's pre-tokenizer name.
        tokens (`list[str]`): One token per id, `vocab_size` of them.
        types (`list[int]`): Their `gguf.TokenType`.
        add_space_prefix (`bool`, *optional*): `add_prefix_space` of `tokenizer_config.json`, when set (Llama).
    """

    folder: Path
    pre: str
    tokens: list[str]
    types: list[int]
    add_space_prefix: bool | None = None
    scores: list[float] | None = None  # SentencePiece (llama.cpp's `llama` tokenizer model) only

    def add_to(self, writer: Any) -> None:
        """Add the tokenizer metadata to a `gguf.GGUFWriter`."""
        import gguf

        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        writer.add_tokenizer_model("gpt2" if self.scores is None else "llama")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.types)
        merges = self.scores is None
        gguf.SpecialVocab(self.folder, load_merges=merges, n_vocab=len(self.tokens)).add_to_gguf(writer, quiet=True)


def _pre_name(data: dict[str, Any]) -> str | None:
    pre = data.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
        return "gpt-2"
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not parts or len(parts) != 2:
        return None
    split, byte_level = parts
    if split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert"):
        return None
    if byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex", True):
        return None
    return _PRE_BY_SPLIT.get((split.get("pattern") or {}).get("Regex"))


def _looks_special(token: str) -> bool:
    return (
        token in _SPECIAL_LOOKING
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def plan_vocab(folders: Sequence[Path | None], vocab_size: int, arch: str) -> GGUFVocab:
    """Read the tokenizer of the first folder that has `tokenizer.json` (the base first).

    Args:
        folders (`Sequence[Path | None]`): Where to look, in order.
        vocab_size (`int`): The model's vocabulary size (`config.json`): the token list is padded to it.
        arch (`str`): The GGUF architecture (`llama` also records `add_prefix_space`).

    Returns:
        `GGUFVocab`: The tokenizer metadata to write.

    Raises:
        `MergeInputError`: No tokenizer file, a SentencePiece-only or non-byte-level tokenizer, an unknown
            pre-tokenizer, or more tokens than the model's vocabulary.
    """
    present = [folder for folder in folders if folder is not None]
    folder = next((f for f in present if (f / "tokenizer.model").is_file() or (f / "tokenizer.json").is_file()), None)
    if folder is None:
        raise MergeInputError(
            "GGUF output embeds the tokenizer, but the base folder has no tokenizer.json nor tokenizer.model; put the "
            "base's tokenizer files next to its weights (tokenizer.save_pretrained(folder))."
        )
    add_space_prefix = None
    config_file = folder / "tokenizer_config.json"
    if arch == "llama" and config_file.is_file():
        value = json.loads(config_file.read_text(encoding="utf-8")).get("add_prefix_space")
        add_space_prefix = bool(value) if value is not None else None
    if (folder / "tokenizer.model").is_file():
        tokens, scores, types = _sentencepiece_tokens(folder, vocab_size)
        return GGUFVocab(folder, "default", tokens, types, add_space_prefix, scores)
    try:
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise MergeInputError(f"tokenizer.json of the base could not be read ({error}); save it again.") from None
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise MergeInputError(
            "GGUF output supports byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2 style); the base's tokenizer is "
            f"{model.get('type')!r}{' with byte fallback (SentencePiece style)' if model.get('byte_fallback') else ''}"
            ". Write safetensors and convert with llama.cpp's convert_hf_to_gguf.py."
        )
    pre = _pre_name(data)
    if pre is None:
        raise MergeInputError(
            "The base tokenizer's pre-tokenizer is not one llama.cpp's byte-level BPE implements here (GPT-2, Llama "
            "3 or Qwen2 split rule); write safetensors and convert with llama.cpp's convert_hf_to_gguf.py."
        )
    tokens, types = _tokens(folder, vocab_size)
    return GGUFVocab(folder, pre, tokens, types, add_space_prefix)


def _tokens(folder: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """One token per id with its type, read with the `tokenizers` library (not transformers: lighter)."""
    import gguf
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    if vocab and max(vocab.values()) >= vocab_size:
        raise MergeInputError(
            f"The tokenizer has token id {max(vocab.values())} but the model's vocab_size is {vocab_size}; the "
            "tokenizer does not belong to this model."
        )
    by_id = {index: token for token, index in vocab.items()}
    added = tokenizer.get_added_tokens_decoder()
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        kind = gguf.TokenType.NORMAL
        entry = added.get(index)
        if entry is not None:
            if not entry.normalized:  # llama.cpp expects added tokens pre-normalized
                ids = tokenizer.encode(token, add_special_tokens=False).ids
                token = tokenizer.decode(ids, skip_special_tokens=False)
            if entry.special or _looks_special(token):
                kind = gguf.TokenType.CONTROL
            else:
                token = token.replace("\u2581", " ")
                kind = gguf.TokenType.USER_DEFINED
        tokens.append(token)
        types.append(kind)
    return tokens, types


def _sentencepiece_tokens(folder: Path, vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and types of `tokenizer.model`, padded to `vocab_size`, with the added tokens of
    `added_tokens.json` and `tokenizer_config.json` (score -1000), as llama.cpp's converter reads them."""
    import gguf

    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise MergeInputError(
            "The base's tokenizer is SentencePiece (tokenizer.model); GGUF output reads it with the sentencepiece "
            "package: pip install sentencepiece."
        ) from None
    types_of = gguf.TokenType
    processor = SentencePieceProcessor()
    try:
        processor.LoadFromFile(str(folder / "tokenizer.model"))
    except (OSError, RuntimeError) as error:
        raise MergeInputError(f"tokenizer.model of the base could not be read ({error}); save it again.") from None
    if processor.vocab_size() > vocab_size:
        raise MergeInputError(
            f"tokenizer.model has {processor.vocab_size()} pieces but the model's vocab_size is {vocab_size}; the "
            "tokenizer does not belong to this model."
        )
    tokens = [f"[PAD{index}]" for index in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [int(types_of.UNUSED)] * vocab_size
    for index in range(processor.vocab_size()):
        kind = types_of.NORMAL
        if processor.IsUnknown(index):
            kind = types_of.UNKNOWN
        elif processor.IsControl(index):
            kind = types_of.CONTROL
        elif processor.IsUnused(index):
            kind = types_of.UNUSED
        elif processor.IsByte(index):
            kind = types_of.BYTE
        tokens[index], scores[index], types[index] = processor.IdToPiece(index), processor.GetScore(index), int(kind)
    added_file = folder / "added_tokens.json"
    if added_file.is_file():
        for token, index in json.loads(added_file.read_text(encoding="utf-8")).items():
            if 0 <= index < vocab_size:
                tokens[index], scores[index], types[index] = token, -1000.0, int(types_of.USER_DEFINED)
    config_file = folder / "tokenizer_config.json"
    decoder = (
        json.loads(config_file.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
        if (config_file.is_file())
        else {}
    )
    for key, entry in decoder.items():
        index, token = int(key), entry["content"]
        if not 0 <= index < vocab_size:
            continue
        if entry.get("special") or _looks_special(token):
            types[index] = int(types_of.CONTROL)
        else:
            token = token.replace("\u2581", " ")
            types[index] = int(types_of.USER_DEFINED)
        tokens[index], scores[index] = token, -1000.0
    return tokens, scores, types
