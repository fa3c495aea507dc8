"""Tokenizers, task prompts and sequence conventions (SPEC §6, §3).

Tokenizers load from a local directory holding a Hugging Face `tokenizer.json` and nothing else is ever
fetched: `tokenizers.Tokenizer.from_str` on the file's text (no `transformers`, no hub).

Sequence conventions, all lengths counting the special tokens:
    encoder prompt  [<s>, p1..pn, </s>]          BART ids <s>=0, <pad>=1, </s>=2; at most 128 ids, </s> always last
    decoder labels  [bos, t1..tn, eos]           Gemma ids pad=0, eos=1, bos=2; at most 128 ids, eos always last
    decoder input   [eos, bos, t1..tn]           labels shifted right, start token eos (1), -100 read as pad
Batches are right-padded: ids with the tokenizer's pad id, labels with -100 (IGNORE_INDEX).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer

IGNORE_INDEX = -100
MAX_TEXT_LEN = 128  # SPEC §6: encoder text and decoder labels are each cut to 128 tokens

# Role -> (token string, id SPEC §6/§3 fixes). The model hard-codes these ids (decoder start 1, forced bos 2
# for the BART presets), so a tokenizer that places them elsewhere is rejected rather than silently used.
DECODER_SPECIALS = {"pad": ("<pad>", 0), "eos": ("<eos>", 1), "bos": ("<bos>", 2)}
ENCODER_SPECIALS = {"bos": ("<s>", 0), "pad": ("<pad>", 1), "eos": ("</s>", 2)}


class TextTokenizer:
    """A `tokenizers.Tokenizer` with our special-id roles; `encode` never adds special tokens."""

    def __init__(self, backend: Tokenizer, pad_id: int, eos_id: int, bos_id: int, path: Path | None = None):
        self.backend = backend  # the raw tokenizers.Tokenizer, for token strings and batch APIs
        self.pad_id, self.eos_id, self.bos_id = pad_id, eos_id, bos_id
        self.path = path
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens (the tokenizer's own post-processor is bypassed)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` over many texts (parallel in the Rust backend)."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of `ids` (a list or a 1-D tensor)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return (f"TextTokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size}, "
                f"pad_id={self.pad_id}, eos_id={self.eos_id}, bos_id={self.bos_id})")


def _load(path: str | Path, specials: dict[str, tuple[str, int]]) -> TextTokenizer:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    if not path.is_dir():
        raise NotADirectoryError(f"tokenizer path is not a directory: {path}")
    file = path / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json in tokenizer directory {path}")
    try:
        backend = Tokenizer.from_str(file.read_text(encoding="utf-8"))
    except Exception as e:  # the Rust side raises a bare Exception for bad JSON or a bad schema
        raise ValueError(f"cannot read tokenizer file {file}: {e}") from e
    ids = {}
    for role, (token, expected) in specials.items():
        found = backend.token_to_id(token)
        if found is None:
            raise ValueError(f"tokenizer {file} has no {role} token {token!r}")
        if found != expected:
            raise ValueError(f"tokenizer {file}: {role} token {token!r} has id {found}, expected {expected}")
        ids[role] = found
    return TextTokenizer(backend, pad_id=ids["pad"], eos_id=ids["eos"], bos_id=ids["bos"], path=path)


def load_decoder_tokenizer(path: str | Path) -> TextTokenizer:
    """Gemma-2 tokenizer from a local directory with `tokenizer.json`: pad 0 (`<pad>`), eos 1, bos 2."""
    return _load(path, DECODER_SPECIALS)


def load_encoder_tokenizer(path: str | Path) -> TextTokenizer:
    """Florence-2 BART tokenizer from a local directory with `tokenizer.json`: `<s>`=0 (bos), `<pad>`=1, `</s>`=2."""
    return _load(path, ENCODER_SPECIALS)


# ---------------------------------------------------------------------------------------------- prompts

LANGUAGES = {"en": "English", "de": "German", "fr": "French", "es": "Spanish", "ru": "Russian",
             "zh": "simplified Chinese"}
TASK_SENTENCES = {
    "<CAPTION>": "What does the image describe?",
    "<DETAILED_CAPTION>": "Describe in detail what is shown in the image.",
    "<MORE_DETAILED_CAPTION>": "Describe with a paragraph what is shown in the image.",
    "<TRANSLATE>": "Translate the following text: {src}",
}
TASKS = ("caption", "detailed_caption", "more_detailed_caption", "translate")
# Optional decoder prefix that forces the caption language (SPEC §6); stripped from generated text.
CAPTION_PREFIXES = {"en": "The image shows", "de": "Das Bild zeigt", "fr": "La photo montre",
                    "es": "La imagen muestra", "ru": "На картинке изображен", "zh": "图为"}

_TAGS_RE = re.compile(r"(?:\s*<[A-Z_]+>)*\s*")
_TAG_RE = re.compile(r"<[A-Z_]+>")


def build_prompt(task_tags: str, src: str | None = None) -> str:
    """English encoder prompt from tags (SPEC §6).

    "<LANG_DE><CAPTION>" -> "The target language is German. What does the image describe?"

    `task_tags` is one task tag (<CAPTION>, <DETAILED_CAPTION>, <MORE_DETAILED_CAPTION>, <TRANSLATE>) and at
    most one <LANG_XX> (XX in EN DE FR ES RU ZH), in any order, whitespace between them allowed; the language
    sentence always comes first. `src` is required with <TRANSLATE> and rejected otherwise.
    """
    if not _TAGS_RE.fullmatch(task_tags):
        raise ValueError(f"prompt must consist of tags like '<LANG_DE><CAPTION>', got {task_tags!r}")
    lang, task = None, None
    for tag in _TAG_RE.findall(task_tags):
        if tag.startswith("<LANG_") and tag[6:-1].lower() in LANGUAGES:
            if lang is not None:
                raise ValueError(f"more than one language tag in {task_tags!r}")
            lang = LANGUAGES[tag[6:-1].lower()]
        elif tag in TASK_SENTENCES:
            if task is not None:
                raise ValueError(f"more than one task tag in {task_tags!r}")
            task = tag
        else:
            raise ValueError(f"unknown prompt tag {tag!r} in {task_tags!r}")
    if task is None:
        raise ValueError(f"no task tag (one of {sorted(TASK_SENTENCES)}) in prompt {task_tags!r}")
    if task == "<TRANSLATE>":
        if src is None or not src.strip():
            raise ValueError(f"<TRANSLATE> needs a non-empty source text, got src={src!r}")
    elif src is not None:
        raise ValueError(f"src is only used with <TRANSLATE>, got src={src!r} for {task_tags!r}")
    sentence = TASK_SENTENCES[task].format(src=src)
    return sentence if lang is None else f"The target language is {lang}. {sentence}"


def prompt_for(task: str, lang: str, src: str | None = None) -> str:
    """`build_prompt` from names: task in TASKS, lang in LANGUAGES (e.g. ("caption", "de"))."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}, expected one of {TASKS}")
    if lang not in LANGUAGES:
        raise ValueError(f"unknown language {lang!r}, expected one of {tuple(LANGUAGES)}")
    return build_prompt(f"<LANG_{lang.upper()}><{task.upper()}>", src)


def strip_prefix(text: str, lang: str) -> str:
    """Remove the caption prefix of `lang` (and the whitespace after it) from the start of `text`.

    Text without the prefix comes back unchanged. Outside Chinese the prefix must end at a word boundary,
    so Russian "изображена" (feminine) is not cut to "а".
    """
    if lang not in CAPTION_PREFIXES:
        raise ValueError(f"unknown language {lang!r}, expected one of {tuple(CAPTION_PREFIXES)}")
    prefix = CAPTION_PREFIXES[lang]
    body = text.lstrip()
    if not body.startswith(prefix):
        return text
    rest = body[len(prefix):]
    if lang != "zh" and rest[:1].isalnum():
        return text
    return rest.lstrip()


# ------------------------------------------------------------------------------------------- sequences

def _wrap(ids: list[int], bos: int, eos: int, max_len: int) -> list[int]:
    if max_len < 3:
        raise ValueError(f"max_len must be at least 3 (bos, one token, eos), got {max_len}")
    return [bos, *ids[: max_len - 2], eos]


def encode_prompt(tok: TextTokenizer, prompt: str, max_len: int = MAX_TEXT_LEN) -> list[int]:
    """Encoder ids `[<s>, p1..pn, </s>]`; `max_len` counts both specials, so at most max_len - 2 prompt tokens."""
    if not prompt.strip():
        raise ValueError(f"empty encoder prompt {prompt!r}")
    ids = tok.encode(prompt)
    return _wrap(ids, tok.bos_id, tok.eos_id, max_len)


def make_labels(tok: TextTokenizer, text: str, max_len: int = MAX_TEXT_LEN) -> list[int]:
    """Decoder labels `[bos, t1..tn, eos]`; `max_len` counts both specials and eos is kept last when cut."""
    if not text.strip():
        raise ValueError(f"empty decoder target {text!r}")
    ids = tok.encode(text)
    return _wrap(ids, tok.bos_id, tok.eos_id, max_len)


def shift_right(
    labels: Sequence[int] | torch.Tensor, start_id: int = 1, pad_id: int = 0
) -> list[int] | torch.Tensor:
    """Decoder input from labels along the last dim: [bos, t1..tn, eos] -> [start_id, bos, t1..tn].

    -100 (ignored label positions) becomes `pad_id`. Lists give lists, tensors (…, L) give tensors.
    """
    if isinstance(labels, torch.Tensor):
        if labels.shape[-1] == 0:
            raise ValueError("cannot shift empty labels")
        out = torch.cat([torch.full_like(labels[..., :1], start_id), labels[..., :-1]], dim=-1)
        return out.masked_fill(out == IGNORE_INDEX, pad_id)
    if len(labels) == 0:
        raise ValueError("cannot shift empty labels")
    return [start_id, *(pad_id if t == IGNORE_INDEX else t for t in labels[:-1])]


def pad_batch(seqs: Sequence[Sequence[int]], pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest: (ids (B, L) int64, mask (B, L) bool, True on real tokens)."""
    if len(seqs) == 0:
        raise ValueError("cannot pad an empty batch")
    length = max(len(s) for s in seqs)
    ids_BL = torch.full((len(seqs), length), pad_value, dtype=torch.long)
    mask_BL = torch.zeros((len(seqs), length), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids_BL[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask_BL[i, : len(s)] = True
    return ids_BL, mask_BL


def pad_labels(seqs: Sequence[Sequence[int]]) -> torch.Tensor:
    """Right-pad label lists with -100 to (B, L) int64."""
    return pad_batch(seqs, IGNORE_INDEX)[0]


# ------------------------------------------------------------------- small tokenizers trained offline

def _train_bpe(tok, texts: Sequence[str], specials: list[str], vocab_size: int, **trainer_kw) -> None:
    from tokenizers import trainers

    if vocab_size <= len(specials):
        raise ValueError(f"vocab_size {vocab_size} leaves no room beyond the special tokens {specials}")
    # BpeTrainer gives the special tokens ids 0..len-1 in list order, as the real vocabularies have them.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  **trainer_kw)
    tok.train_from_iterator(list(texts), trainer=trainer)


def _save_tokenizer(tok, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "tokenizer.json.tmp"
    tok.save(str(tmp))
    tmp.replace(directory / "tokenizer.json")  # never a half-written tokenizer.json
    return directory


def train_decoder_tokenizer(directory: str | Path, texts: Sequence[str], vocab_size: int = 512) -> TextTokenizer:
    """Train a small Gemma-2-like tokenizer on `texts`, write `directory/tokenizer.json`, return it loaded.

    SentencePiece-style BPE (spaces read as "▁", merges inside "▁word" pieces), special ids `<pad>`=0,
    `<eos>`=1, `<bos>`=2, `<unk>`=3 as SPEC §6 requires, and byte fallback (`<0x00>`..`<0xFF>`, 256 of the
    `vocab_size` ids) so any text round-trips, including characters never seen in `texts`. The vocabulary
    holds at most `vocab_size` entries; training is deterministic for the same `texts`.
    """
    import json as _json

    from tokenizers import decoders, models, normalizers, pre_tokenizers

    specials = [tok for tok, _ in sorted(DECODER_SPECIALS.values(), key=lambda t: t[1])] + ["<unk>"]
    trained = vocab_size - 256
    if trained < len(specials) + 1:
        raise ValueError(f"decoder vocab_size {vocab_size} is too small: 256 byte tokens + {len(specials)} specials")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    # Characters beyond the budget are left to byte fallback rather than crowding out every merge.
    _train_bpe(tok, texts, specials, trained, limit_alphabet=max(1, trained - len(specials)))
    spec = _json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):  # the trainer cannot add byte tokens itself; append them, then switch fallback on
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["model"]["fuse_unk"] = True
    tok = Tokenizer.from_str(_json.dumps(spec))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    if tok.get_vocab_size(with_added_tokens=True) > vocab_size:
        raise ValueError(f"decoder tokenizer came out with {tok.get_vocab_size()} entries > {vocab_size}")
    return load_decoder_tokenizer(_save_tokenizer(tok, directory))


def train_encoder_tokenizer(directory: str | Path, texts: Sequence[str], vocab_size: int = 512) -> TextTokenizer:
    """Train a small BART-like (byte-level BPE) tokenizer on `texts`, write `directory/tokenizer.json`, load it.

    Special ids `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3 (SPEC §3); the 256-symbol byte alphabet is always
    included, so any text round-trips and `vocab_size` must exceed 260. Deterministic for the same `texts`.
    """
    from tokenizers import decoders, models, pre_tokenizers, processors

    specials = [tok for tok, _ in sorted(ENCODER_SPECIALS.values(), key=lambda t: t[1])] + ["<unk>"]
    if vocab_size < 256 + len(specials):
        raise ValueError(f"encoder vocab_size {vocab_size} is too small: 256 byte symbols + {len(specials)} specials")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    _train_bpe(tok, texts, specials, vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    if tok.get_vocab_size(with_added_tokens=True) > vocab_size:
        raise ValueError(f"encoder tokenizer came out with {tok.get_vocab_size()} entries > {vocab_size}")
    return load_encoder_tokenizer(_save_tokenizer(tok, directory))
