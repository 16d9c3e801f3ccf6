"""Rebuild the CLIP BPE tokenizer files that sdtune ships, from open-clip's merges file.

Run once, offline:

    python scripts/build_clip_tokenizer.py /path/to/open_clip/bpe_simple_vocab_16e6.txt.gz

The merges file comes with the `open-clip-torch` wheel on PyPI (install it with `--no-deps`, or
unzip the wheel). The vocabulary is derived exactly as CLIP defines it: the 256 byte symbols, the
same with the end-of-word mark `</w>`, one token per merge (the first 48,894 merges), then the two
special tokens, 49,408 in all. SD 1 and SD 2 text encoders share this vocabulary; they differ only
in the padding token: SD 1 pads with `<|endoftext|>`, SD 2 with `!` (id 0). The SD 2 settings go to
a sibling folder `tokenizer_sd2/` holding only the two small JSON files, so the 2 MB vocabulary is
shipped once.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

VOCAB_SIZE = 49408
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48,894
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "sdtune" / "models" / "configs" / "tokenizer"
SD2_PAD = "!"


def byte_symbols() -> list[str]:
    """One printable unicode character per byte value, in CLIP's order.

    Bytes that are already printable (and not whitespace/control) stand for themselves and come
    first; the rest are mapped to code points from 256 upwards, in byte order.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    symbols = [chr(b) for b in printable]
    extra = 0
    for b in range(256):
        if b not in printable:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def read_merges(bpe_gz: Path) -> list[tuple[str, str]]:
    """The first NUM_MERGES merge pairs; line 0 of the file is a version header."""
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    pairs = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    if len(pairs) != NUM_MERGES or any(len(p) != 2 for p in pairs):
        raise SystemExit(f"{bpe_gz}: expected {NUM_MERGES} merge pairs after the header line")
    return pairs  # type: ignore[return-value]


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise SystemExit(f"built {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab


def tokenizer_config(pad_token: str = EOS) -> dict:
    """Settings for `CLIPTokenizer.from_pretrained`; SD 1 pads with the end token."""
    return {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "errors": "replace",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": pad_token,
        "clean_up_tokenization_spaces": True,
    }


def write_files(out_dir: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out_dir / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    write_settings(out_dir, tokenizer_config())
    write_settings(out_dir.with_name(out_dir.name + "_sd2"), tokenizer_config(pad_token=SD2_PAD))


def write_settings(out_dir: Path, config: dict) -> None:
    """tokenizer_config.json and special_tokens_map.json (transformers reads both)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bpe_gz", type=Path, help="open-clip's bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args()
    merges = read_merges(args.bpe_gz)
    vocab = build_vocab(merges)
    write_files(args.out, vocab, merges)
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {args.out}")


if __name__ == "__main__":
    main()
