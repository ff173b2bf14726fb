"""What the GGUF tests and benchmark share: a byte-level BPE tokenizer trained here in about a second, and llama.cpp's
own converters (`convert_hf_to_gguf.py`, `convert_lora_to_gguf.py` from llama-cpp-python's source package, extracted
by `.ci/run` into the git-ignored `.ci/cache/llama.cpp`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONVERTER = Path(os.environ.get("LLAMA_CPP_CONVERTER_DIR", REPO / ".ci" / "cache" / "llama.cpp"))
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Merging adapters in factor space keeps every delta low rank.",
    "llama.cpp loads GGUF files; 12 345 numbers and punctuation!?",
    "Hello world, hello merge, hello tokenizer training in one second.",
] * 20
CHAT_TEMPLATE = "{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n{% endfor %}"


def train_tokenizer(folder: Path, split: str = LLAMA3_SPLIT, vocab_size: int = 360) -> int:
    """Train a byte-level BPE with the given split rule (Llama 3's or Qwen2's) and save it with `save_pretrained`
    (bos/eos, a chat template); returns its size."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    # <|endoftext|>: transformers' Qwen2 tokenizer class adds it when missing (real Qwen2 tokenizers have it).
    specials = ["<|begin|>", "<|end_of_text|>", "<|start|>", "<|end|>", "<|endoftext|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(TEXT, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|begin|>", eos_token="<|end_of_text|>", chat_template=CHAT_TEMPLATE
    )
    fast.save_pretrained(folder)
    return len(fast)


def train_sentencepiece(folder: Path, vocab_size: int = 400) -> int:
    """Train a SentencePiece BPE model with byte fallback (Llama 2 / Mistral style), saved as `tokenizer.model`
    (unk 0, bos 1, eos 2); returns its size."""
    import io

    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return vocab_size


def converter_command(
    jobs: Sequence[tuple[Path, Path, str, str]], lora_jobs: Sequence[tuple[Path, Path, Path, str]] = ()
) -> list[str]:
    """One process that runs llama.cpp's convert_hf_to_gguf.py for each `(folder, outfile, outtype, pre)` job, then
    convert_lora_to_gguf.py for each `(adapter, base, outfile, outtype)` job (one start-up for all of them).

    The model converter recognizes published tokenizers by hashing their output on a fixed text; a tokenizer trained
    here is new to it, so its pre-tokenizer name (`pre`) is given, what convert_hf_to_gguf_update.py would add."""
    lines = [
        "import runpy, sys",
        f"sys.path[:0] = [{str(CONVERTER)!r}, {str(CONVERTER / 'gguf-py')!r}]",
        "from conversion import base",
        "import convert_hf_to_gguf",
    ]
    for folder, outfile, outtype, pre in jobs:
        lines += [
            f"base.TextModel.get_vocab_base_pre = lambda self, tokenizer: {pre!r}",
            f"sys.argv = ['convert_hf_to_gguf.py', {str(folder)!r}, '--outfile', {str(outfile)!r}, '--outtype', "
            f"{outtype!r}]",
            "convert_hf_to_gguf.main()",
        ]
    for adapter, base_folder, outfile, outtype in lora_jobs:
        lines += [
            f"sys.argv = ['convert_lora_to_gguf.py', '--base', {str(base_folder)!r}, '--outfile', {str(outfile)!r}, "
            f"'--outtype', {outtype!r}, {str(adapter)!r}]",
            f"runpy.run_path({str(CONVERTER / 'convert_lora_to_gguf.py')!r}, run_name='__main__')",
        ]
    return [sys.executable, "-c", "\n".join(lines)]


def run(command: Sequence[str]) -> None:
    """Run a converter; its error output in the failure message."""
    result = subprocess.run(list(command), capture_output=True, text=True, timeout=600)
    if result.returncode:
        raise AssertionError(f"{command[:3]} failed:\n{result.stderr[-3000:]}")


def converter_available() -> bool:
    """Whether llama.cpp's converters are extracted where `.ci/run` puts them."""
    return (CONVERTER / "convert_hf_to_gguf.py").is_file()
