"""CLIP tokenizer parity: our ids/masks == transformers' tokenizer(prompts, padding="max_length",
max_length=L, truncation=True) on the tiny CLIP-format folder, for hard prompts.

In transformers 5.x `CLIPTokenizer` and `CLIPTokenizerFast` are the same class (the slow Python
tokenizer was removed), so both names are checked and, in its place, an independent pure-Python
OpenAI-style BPE (`_reference_ids`, HF normalisation, no ftfy) serves as the second oracle.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import unicodedata
from pathlib import Path

import pytest
import torch

from cascade_rt.models.tokenizer import CLIPTokenizer, write_tiny_clip_vocab

transformers = pytest.importorskip("transformers")
regex = pytest.importorskip("regex")

_LONG = ", ".join(["a beautiful painting of a red fox in a snowy forest at sunset"] * 8)
PROMPTS = [
    "a photo of a cat riding a horse",
    "An Astronaut Riding A HORSE on the Moon",
    "it's the dog's ball, isn't it? we'll see... they'd've (maybe) -- ok!!",
    "1024x1536 image, 3.14159 and 2024",
    "café crème brûlée à la façon de Zoë, naïve résumé",
    "cafe\u0301 vs café",  # decomposed accent: NFC makes both the same
    "東京の夜景 一只猫 한국어",
    "🐱🚀 a cat astronaut 👩🏽‍🚀",
    "  tabs\there\n\nnewlines   and   spaces  ",
    "",
    "non\u00a0breaking space",
    "ＦＵＬＬ width ﬁne “quoted” — dash",
    "\u0130stanbul ǅ",
    _LONG,
]
SPECIAL_PROMPT = "<|startoftext|> x <|endoftext|> y <|STARTOFTEXT|> <|EndOfText|>"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_clip")
    write_tiny_clip_vocab(path)
    return path


def _hf(tok, prompts: list[str], max_length: int):
    out = tok(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    )
    return out.input_ids, out.attention_mask


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    symbols = [*word[:-1], word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = [(ranks.get(p, len(ranks)), i) for i, p in enumerate(itertools.pairwise(symbols))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        first, second = symbols[i], symbols[i + 1]
        merged, j = [], 0
        while j < len(symbols):
            if j + 1 < len(symbols) and symbols[j] == first and symbols[j + 1] == second:
                merged.append(first + second)
                j += 2
            else:
                merged.append(symbols[j])
                j += 1
        symbols = merged
    return symbols


def _reference_ids(folder: Path, text: str) -> list[int]:
    """OpenAI CLIP BPE in plain Python, transformers' normalisation (NFC, \\s+ -> ' ', lower)."""
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    ranks = {tuple(line.split()): i for i, line in enumerate(lines)}
    byte_chars = list(vocab)[:256]  # the first 256 ids are the bytes in byte->unicode order
    order = [*range(33, 127), *range(161, 173), *range(174, 256)]
    order += [b for b in range(256) if b not in order]
    byte_encoder = dict(zip(order, byte_chars, strict=True))
    text = regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).lower()
    pattern = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
    ids = []
    for piece in regex.findall(pattern, text):
        word = "".join(byte_encoder[b] for b in piece.encode("utf-8"))
        ids += [vocab[t] for t in _bpe(word, ranks)]
    return ids


@pytest.mark.parametrize("name", ["CLIPTokenizerFast", "CLIPTokenizer"])
@pytest.mark.parametrize("max_length", [77, 12])
def test_matches_transformers(folder: Path, name: str, max_length: int) -> None:
    ours = CLIPTokenizer.from_folder(folder)
    ref = getattr(transformers, name).from_pretrained(str(folder))
    assert ours.vocab_size == len(ref)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        ref.bos_token_id,
        ref.eos_token_id,
        ref.pad_token_id,
    )
    prompts = [*PROMPTS, SPECIAL_PROMPT]
    batch = ours(prompts, max_length=max_length)
    ids, mask = _hf(ref, prompts, max_length)
    assert batch.input_ids.dtype == torch.int64 and batch.attention_mask.dtype == torch.int64
    for i, p in enumerate(prompts):
        assert batch.input_ids[i].tolist() == ids[i].tolist(), repr(p)
        assert batch.attention_mask[i].tolist() == mask[i].tolist(), repr(p)
    assert batch.input_ids[PROMPTS.index(""), :3].tolist() == [
        ref.bos_token_id,
        ref.eos_token_id,
        ref.pad_token_id,
    ]

    # truncated text, as diffusers computes it: decode(untruncated[max_length - 1 : -1])
    for i, p in enumerate(prompts):
        full = ref(p).input_ids
        expected = ref.decode(full[max_length - 1 : -1]) if len(full) > max_length else None
        assert batch.truncated[i] == expected, repr(p)
    assert batch.truncated[PROMPTS.index(_LONG)]


def test_matches_independent_python_bpe(folder: Path) -> None:
    ours = CLIPTokenizer.from_folder(folder)
    for p in PROMPTS:
        ids = ours([p], max_length=200).input_ids[0]
        body = ids[1 : int(ours([p], max_length=200).attention_mask.sum()) - 1].tolist()
        assert body == _reference_ids(folder, p), repr(p)


def test_truncation_boundary(folder: Path) -> None:
    ours = CLIPTokenizer.from_folder(folder)
    fits = ours(["cat " * 75, "cat " * 76], max_length=77)
    assert fits.truncated == [None, "cat"]
    assert fits.attention_mask.sum(dim=1).tolist() == [77, 77]
    assert fits.input_ids[:, -1].tolist() == [ours.eos_token_id] * 2


def test_tiny_vocab_layout(folder: Path, tmp_path: Path) -> None:
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version")
    assert len(vocab) == 514 + len(merges) - 1
    assert vocab["<|startoftext|>"] == len(vocab) - 2 and vocab["<|endoftext|>"] == len(vocab) - 1
    assert sorted(vocab.values()) == list(range(len(vocab)))
    ours = CLIPTokenizer.from_folder(folder)
    for word in ("photo", "cat", "horse", "astronaut", "painting", "the"):
        assert len(ours.backend.encode(word, add_special_tokens=False).ids) == 1, word
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert (config["pad_token"], config["model_max_length"]) == ("<|endoftext|>", 77)
    write_tiny_clip_vocab(tmp_path)  # deterministic
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (folder / name).read_bytes(), name


def test_tokenizer_json_folder(folder: Path, tmp_path: Path) -> None:
    # transformers' save_pretrained writes tokenizer.json; load from it with vocab/merges removed.
    ref = transformers.CLIPTokenizerFast.from_pretrained(str(folder))
    ref.save_pretrained(str(tmp_path))
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).unlink(missing_ok=True)
    assert (tmp_path / "tokenizer.json").is_file()
    ours = CLIPTokenizer.from_folder(tmp_path)
    prompts = [*PROMPTS, SPECIAL_PROMPT]
    ids, mask = _hf(ref, prompts, 77)
    batch = ours(prompts)
    assert torch.equal(batch.input_ids, ids) and torch.equal(batch.attention_mask, mask)


def test_missing_files(tmp_path: Path, folder: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape("neither tokenizer.json")):
        CLIPTokenizer.from_folder(tmp_path)
    shutil.copy(folder / "vocab.json", tmp_path)
    shutil.copy(folder / "merges.txt", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|nope|>"}))
    with pytest.raises(
        ValueError, match=re.escape("pad_token '<|nope|>' is not in the vocabulary")
    ):
        CLIPTokenizer.from_folder(tmp_path)
