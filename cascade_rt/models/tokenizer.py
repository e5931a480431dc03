"""CLIP byte-level BPE tokenizer on the `tokenizers` library, equal to transformers'
CLIPTokenizerFast.

The pipeline is the one transformers 5.x builds for CLIP, whatever files the folder holds
(transformers takes only the vocabulary and merges from a `tokenizer.json` and rebuilds the rest):
NFC -> collapse whitespace runs to one space -> lowercase; split on the CLIP regex, then
byte-level mapping; BPE with the "</w>" end-of-word suffix; `<|startoftext|>` ... `<|endoftext|>`
around each prompt. No ftfy / HTML unescaping (§8.2). Padding and truncation are done here, as
`tokenizer(prompts, padding="max_length", max_length=77, truncation=True)` does them, with the pad
token of the folder's config (Stable Cascade: `<|endoftext|>` = 49407, §8.1).

`write_tiny_clip_vocab` writes a small but real CLIP-format tokenizer folder for the built-in
tiny random-weight cascade and for tests.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
EOW = "</w>"
# transformers' CLIPTokenizer split pattern: specials, contractions, letter runs, single digits,
# runs of other non-space characters.
_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"""
    r"""|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized")
_DEFAULT_SPECIALS = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}


@dataclass
class TokenizedBatch:
    """input_ids, attention_mask: int64 [B, L]; truncated[i]: text cut from prompt i, or None."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    truncated: list[str | None]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _content(token: str | dict[str, Any]) -> str:
    """A special token given as a string or as a serialized AddedToken dict."""
    return token["content"] if isinstance(token, dict) else token


def _added_token(content: str, spec: str | dict[str, Any] | None) -> AddedToken:
    """AddedToken with the flags the folder states (transformers' defaults otherwise)."""
    flags = spec if isinstance(spec, dict) else {}
    return AddedToken(content, special=True, **{f: flags.get(f, False) for f in _TOKEN_FLAGS})


class CLIPTokenizer:
    """CLIP tokenizer: `CLIPTokenizer.from_folder(path)(prompts)` -> TokenizedBatch."""

    def __init__(
        self, backend: Tokenizer, specials: dict[str, str], model_max_length: int = 77
    ) -> None:
        self.backend = backend
        self.model_max_length = model_max_length
        ids = {key: backend.token_to_id(specials[key]) for key in _SPECIAL_KEYS}
        missing = [key for key, tid in ids.items() if tid is None]
        if missing:
            raise ValueError(f"CLIPTokenizer: {missing} not in the vocabulary ({specials})")
        self.bos_token_id: int = ids["bos_token"]
        self.eos_token_id: int = ids["eos_token"]
        self.pad_token_id: int = ids["pad_token"]

    @classmethod
    def from_folder(cls, path: str | Path) -> CLIPTokenizer:
        """Load a Hugging Face CLIP tokenizer folder (`tokenizer.json`, or vocab.json + merges.txt).

        Special tokens and `model_max_length` come from tokenizer_config.json, then
        special_tokens_map.json, then transformers' CLIP defaults.
        """
        folder = Path(path)
        config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        specs = {k: config.get(k, special_map.get(k)) for k in _SPECIAL_KEYS}
        specials = {k: _content(v) if v else _DEFAULT_SPECIALS[k] for k, v in specs.items()}

        if (folder / "tokenizer.json").is_file():
            backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
            backend.no_padding()
            backend.no_truncation()
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            model = BPE.from_file(
                str(folder / "vocab.json"),
                str(folder / "merges.txt"),
                dropout=None,
                continuing_subword_prefix="",
                end_of_word_suffix=EOW,
                fuse_unk=False,
                unk_token=specials["unk_token"],
            )
            backend = Tokenizer(model)
        else:
            raise FileNotFoundError(
                f"CLIPTokenizer.from_folder: {folder} has neither tokenizer.json nor "
                "vocab.json + merges.txt"
            )
        backend.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        backend.decoder = decoders.ByteLevel()

        # Flags per special token, first source wins: tokenizer_config's added_tokens_decoder,
        # tokenizer.json's added tokens, then the special tokens given as dicts.
        flags: dict[str, Any] = {}
        for entry in config.get("added_tokens_decoder", {}).values():
            flags.setdefault(entry["content"], entry)
        for tok in backend.get_added_tokens_decoder().values():
            flags.setdefault(tok.content, {f: getattr(tok, f) for f in _TOKEN_FLAGS})
        for spec in specs.values():
            if isinstance(spec, dict):
                flags.setdefault(spec["content"], spec)
        for key in _SPECIAL_KEYS:
            # transformers would append an unknown special token as a new id, which the text
            # encoder's embedding table does not have.
            if backend.token_to_id(specials[key]) is None:
                raise ValueError(
                    f"CLIPTokenizer: {key} {specials[key]!r} is not in the vocabulary of {folder}"
                )
        contents = list(dict.fromkeys(specials[k] for k in _SPECIAL_KEYS))
        backend.add_special_tokens([_added_token(c, flags.get(c)) for c in contents])

        max_len = config.get("model_max_length", 77)
        # Folders without a limit store a huge sentinel (int(1e30)); CLIP has 77 positions.
        return cls(backend, specials, int(max_len) if max_len < 1_000_000 else 77)

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the text encoder's `vocab_size`)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` as transformers decodes it ("</w>" -> space, stripped; specials kept)."""
        return self.backend.decode(list(ids), skip_special_tokens=False).replace(EOW, " ").strip()

    def __call__(self, prompts: str | Sequence[str], max_length: int = 77) -> TokenizedBatch:
        """BOS + up to max_length-2 tokens + EOS, right-padded with the pad id to max_length."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if max_length < 2:
            raise ValueError(f"CLIPTokenizer: max_length must be >= 2, got {max_length}")
        keep = max_length - 2
        ids = torch.full((len(prompts), max_length), self.pad_token_id, dtype=torch.int64)
        mask = torch.zeros((len(prompts), max_length), dtype=torch.int64)
        truncated: list[str | None] = []
        for i, enc in enumerate(self.backend.encode_batch(list(prompts), add_special_tokens=False)):
            tokens = enc.ids
            truncated.append(self.decode(tokens[keep:]) if len(tokens) > keep else None)
            row = [self.bos_token_id, *tokens[:keep], self.eos_token_id]
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
            mask[i, : len(row)] = 1
        return TokenizedBatch(input_ids=ids, attention_mask=mask, truncated=truncated)


# ---- tiny CLIP-format vocabulary -------------------------------------------------------------

# Common English and prompt words, most frequent first: the BPE merges are learned on them with
# weights falling with the position, so the first words become single tokens.
_WORD_TEXT = """
a the of and in on with to is at by for an from it this that as are be or its his her their
photo picture image painting drawing portrait illustration render art style of digital oil
cat dog horse bird fish lion tiger bear wolf fox rabbit owl eagle dragon robot astronaut man
woman girl boy child people person king queen knight wizard warrior monster
red blue green yellow black white orange purple pink brown gray golden silver
big small tall old young happy beautiful cute dark bright colorful detailed high quality
sunset sunrise night day sky sun moon star stars cloud clouds rain snow fire water ocean sea
river lake mountain mountains forest tree trees flower flowers garden field grass desert beach
city street house castle tower bridge road car train ship boat space planet galaxy
riding sitting standing running flying walking wearing holding looking playing reading
hat coat dress shirt glasses sword book table chair window door light shadow
cinematic lighting realistic photorealistic sharp focus trending artstation concept
landscape closeup view background foreground scene world universe future ancient
"""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable character table, in CLIP's vocabulary order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return {b: table[b] for b in [*printable, *(b for b in range(256) if b not in printable)]}


def _learn_merges(words: list[str], num_merges: int, known: set[str]) -> list[tuple[str, str]]:
    """Greedy BPE training: repeatedly merge the heaviest adjacent pair (ties: smallest pair)."""
    unique = list(dict.fromkeys(words))
    corpus = {(*w[:-1], w[-1] + EOW): len(unique) - i for i, w in enumerate(unique)}
    merges: list[tuple[str, str]] = []
    known = set(known)
    while len(merges) < num_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, n in corpus.items():
            for pair in itertools.pairwise(symbols):
                pairs[pair] += n
        # A merge must create a new vocabulary entry: skip pairs whose join already exists.
        candidates = sorted((-n, pair) for pair, n in pairs.items() if "".join(pair) not in known)
        if not candidates:
            raise ValueError(
                f"write_tiny_clip_vocab: the word list yields only {len(merges)} merges, "
                f"{num_merges} requested"
            )
        best = candidates[0][1]
        merges.append(best)
        known.add("".join(best))
        corpus = {_apply_merge(symbols, best): n for symbols, n in corpus.items()}
    return merges


def _apply_merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def write_tiny_clip_vocab(folder: Path, num_merges: int = 400, model_max_length: int = 77) -> None:
    """Write a small real CLIP tokenizer folder: vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json (the Stable Cascade hub layout, pad = EOS).

    Ids: 256 byte characters, their "</w>" forms, one id per merge, then BOS and EOS as the last
    two ids, so the vocabulary has 514 + num_merges entries (BOS = 512 + num_merges).
    Deterministic: the same arguments always give the same files.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + EOW for c in alphabet]
    merges = _learn_merges(_WORD_TEXT.split(), num_merges, set(tokens))
    tokens += ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}

    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")

    def spec(content: str, normalized: bool) -> dict[str, Any]:
        flags = {"lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}
        return {"content": content, **flags}

    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(vocab[BOS]): {**spec(BOS, True), "special": True},
            str(vocab[EOS]): {**spec(EOS, False), "special": True},
        },
        "bos_token": BOS,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": EOS,
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": EOS,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": EOS,
    }
    special_map = {
        "bos_token": spec(BOS, True),
        "eos_token": spec(EOS, False),
        "pad_token": EOS,
        "unk_token": spec(EOS, False),
    }
    for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map)):
        (folder / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
