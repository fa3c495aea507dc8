"""Tiny stand-ins for the real tokenizers, built offline with the `tokenizers` library.

Both are saved as `tokenizer.json` in a directory, exactly as the Hugging Face repos ship them, and keep
the structure that matters to us:

- Gemma-like (decoder): SentencePiece-style BPE, spaces normalised to "▁", byte fallback (`<0x00>`…`<0xFF>`)
  so any text round-trips, a post-processor that prepends `<bos>` (as Gemma-2's does — our `encode` must
  not add it), special ids `<pad>`=0, `<eos>`=1, `<bos>`=2, `<unk>`=3.
- BART-like (encoder): byte-level BPE (any text round-trips), RoBERTa post-processor adding `<s>`…`</s>`
  (again our `encode` must not), special ids `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3.

Vocabularies are a few hundred entries, so building one takes milliseconds.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

CORPUS = [
    "The target language is English. What does the image describe?",
    "The target language is German. Describe in detail what is shown in the image.",
    "The target language is French. Describe with a paragraph what is shown in the image.",
    "The target language is Spanish. Translate the following text: A dog runs on the beach.",
    "The target language is Russian. The target language is simplified Chinese.",
    "The image shows a dog running on the beach. Das Bild zeigt einen Hund am Strand.",
    "La photo montre un chien. La imagen muestra un perro. A man rides a red bicycle.",
]

GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
BART_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]


def _train(tok: Tokenizer, specials: list[str], vocab_size: int, **trainer_kw: object) -> None:
    # BpeTrainer gives the special tokens ids 0..len-1 in list order, as the real vocabularies have them.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False, **trainer_kw)
    tok.train_from_iterator(CORPUS, trainer=trainer)


def make_gemma_like_tokenizer(directory: str | Path, vocab_size: int = 300) -> Path:
    """Write a tiny Gemma-2-like `tokenizer.json` into `directory` (created if needed); return the directory."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    _train(tok, GEMMA_SPECIALS, vocab_size)
    # The trainer cannot add byte tokens as ordinary vocabulary, so append them in the JSON and switch on
    # byte fallback: characters never seen in the corpus (Cyrillic, CJK) then encode as <0xXX> and decode back.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["model"]["fuse_unk"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 2)]
    )
    return _save(tok, directory)


def make_bart_like_tokenizer(directory: str | Path, vocab_size: int = 400) -> Path:
    """Write a tiny BART-like (byte-level BPE) `tokenizer.json` into `directory`; return the directory."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    _train(tok, BART_SPECIALS, vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return _save(tok, directory)


def _save(tok: Tokenizer, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory
