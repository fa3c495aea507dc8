"""Tokenizer loading, SPEC §6 prompts and the sequence conventions, on tiny offline tokenizers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from florenz_fast.text import (
    IGNORE_INDEX,
    TextTokenizer,
    build_prompt,
    encode_prompt,
    load_decoder_tokenizer,
    load_encoder_tokenizer,
    make_labels,
    pad_batch,
    pad_labels,
    prompt_for,
    shift_right,
    strip_prefix,
)
from tests.helpers.tokenizer_fixtures import make_bart_like_tokenizer, make_gemma_like_tokenizer

ROUND_TRIP = [
    "The image shows a dog running on the beach.",
    "Das Bild zeigt einen Hund am Strand.",
    "На картинке изображен кот",  # no Cyrillic in the training corpus: byte fallback / byte-level
    "图为一只狗",
    "  two  spaces, trailing ",
]


@pytest.fixture(scope="module")
def dec_tok(tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    return load_decoder_tokenizer(make_gemma_like_tokenizer(tmp_path_factory.mktemp("gemma")))


@pytest.fixture(scope="module")
def enc_tok(tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    return load_encoder_tokenizer(make_bart_like_tokenizer(tmp_path_factory.mktemp("bart")))


# ----------------------------------------------------------------------------------------- loading

def test_special_ids(dec_tok: TextTokenizer, enc_tok: TextTokenizer) -> None:
    assert (dec_tok.pad_id, dec_tok.eos_id, dec_tok.bos_id) == (0, 1, 2)
    assert (enc_tok.bos_id, enc_tok.pad_id, enc_tok.eos_id) == (0, 1, 2)
    assert [dec_tok.backend.id_to_token(i) for i in range(3)] == ["<pad>", "<eos>", "<bos>"]
    assert [enc_tok.backend.id_to_token(i) for i in range(3)] == ["<s>", "<pad>", "</s>"]


def test_vocab_size(dec_tok: TextTokenizer, enc_tok: TextTokenizer) -> None:
    # Gemma-like: trained BPE followed by the 256 byte-fallback tokens; BART-like: exactly the trained 400.
    assert dec_tok.vocab_size == len(dec_tok.backend.get_vocab(with_added_tokens=True))
    assert dec_tok.backend.token_to_id("<0x00>") == dec_tok.vocab_size - 256
    assert dec_tok.backend.token_to_id("<0xFF>") == dec_tok.vocab_size - 1
    assert enc_tok.vocab_size == 400


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_without_specials(dec_tok: TextTokenizer, enc_tok: TextTokenizer, text: str) -> None:
    for tok, bos in ((dec_tok, 2), (enc_tok, 0)):
        ids = tok.encode(text)
        # The tokenizers' own post-processors add <bos> / <s>…</s>; ours must not.
        assert ids == [i for i in tok.backend.encode(text).ids if i not in (0, 1, 2)]
        assert tok.backend.encode(text).ids[0] == bos
        assert min(ids) > 2
        assert tok.decode(ids) == text
        assert tok.decode(torch.tensor(ids)) == text


def test_encode_batch_matches_encode(dec_tok: TextTokenizer) -> None:
    assert dec_tok.encode_batch(ROUND_TRIP) == [dec_tok.encode(t) for t in ROUND_TRIP]


def test_decode_skips_specials_unless_asked(dec_tok: TextTokenizer, enc_tok: TextTokenizer) -> None:
    ids = dec_tok.encode("a dog")
    assert dec_tok.decode([2, *ids, 1, 0, 0]) == "a dog"
    assert dec_tok.decode([2, *ids, 1, 0], skip_special_tokens=False) == "<bos>a dog<eos><pad>"
    ids = enc_tok.encode("a dog")
    assert enc_tok.decode([0, *ids, 2, 1]) == "a dog"
    assert enc_tok.decode([0, *ids, 2, 1], skip_special_tokens=False) == "<s>a dog</s><pad>"


def test_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    for load in (load_decoder_tokenizer, load_encoder_tokenizer):
        with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
            load(missing)


def test_path_is_a_file(tmp_path: Path) -> None:
    file = make_gemma_like_tokenizer(tmp_path) / "tokenizer.json"
    with pytest.raises(NotADirectoryError, match=re.escape(str(file))):
        load_decoder_tokenizer(file)


def test_directory_without_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json in .*" + re.escape(str(tmp_path))):
        load_encoder_tokenizer(tmp_path)


@pytest.mark.parametrize("content", [b"", b"{not json", b'{"model": 3}', b"\xff\xfe\x00garbage"])
def test_corrupt_tokenizer_json(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "tokenizer.json").write_bytes(content)
    with pytest.raises(ValueError, match=r"cannot read tokenizer file .*" + re.escape(str(tmp_path))):
        load_decoder_tokenizer(tmp_path)


def test_truncated_real_file_is_corrupt(tmp_path: Path) -> None:
    file = make_bart_like_tokenizer(tmp_path) / "tokenizer.json"
    file.write_bytes(file.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot read tokenizer file"):
        load_encoder_tokenizer(tmp_path)


def _word_level(directory: Path, vocab: dict[str, int]) -> Path:
    tok = Tokenizer(models.WordLevel(vocab, unk_token=next(iter(vocab))))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    return directory


def test_missing_special_token(tmp_path: Path) -> None:
    path = _word_level(tmp_path / "t", {"<pad>": 0, "<eos>": 1, "dog": 2})
    with pytest.raises(ValueError, match=r"has no bos token '<bos>'"):
        load_decoder_tokenizer(path)
    # A Gemma tokenizer handed to the encoder loader (and vice versa) fails on the first missing token.
    with pytest.raises(ValueError, match=r"has no bos token '<s>'"):
        load_encoder_tokenizer(make_gemma_like_tokenizer(tmp_path / "g"))
    # BART's <pad> exists but sits at id 1, so the decoder loader stops there.
    with pytest.raises(ValueError, match=r"pad token '<pad>' has id 1, expected 0"):
        load_decoder_tokenizer(make_bart_like_tokenizer(tmp_path / "b"))


def test_special_token_at_wrong_id(tmp_path: Path) -> None:
    path = _word_level(tmp_path / "t", {"<eos>": 0, "<pad>": 1, "<bos>": 2})
    with pytest.raises(ValueError, match=r"pad token '<pad>' has id 1, expected 0"):
        load_decoder_tokenizer(path)


# ----------------------------------------------------------------------------------------- prompts

LANG_SENTENCE = {
    "en": "The target language is English.",
    "de": "The target language is German.",
    "fr": "The target language is French.",
    "es": "The target language is Spanish.",
    "ru": "The target language is Russian.",
    "zh": "The target language is simplified Chinese.",
}
TASK_SENTENCE = {
    "caption": "What does the image describe?",
    "detailed_caption": "Describe in detail what is shown in the image.",
    "more_detailed_caption": "Describe with a paragraph what is shown in the image.",
}


def test_spec_example() -> None:
    assert build_prompt("<LANG_DE><CAPTION>") == "The target language is German. What does the image describe?"


@pytest.mark.parametrize("lang", list(LANG_SENTENCE))
@pytest.mark.parametrize("task", list(TASK_SENTENCE))
def test_caption_prompts(lang: str, task: str) -> None:
    expected = f"{LANG_SENTENCE[lang]} {TASK_SENTENCE[task]}"
    assert build_prompt(f"<LANG_{lang.upper()}><{task.upper()}>") == expected
    assert prompt_for(task, lang) == expected


@pytest.mark.parametrize("lang", list(LANG_SENTENCE))
def test_translate_prompts(lang: str) -> None:
    expected = f"{LANG_SENTENCE[lang]} Translate the following text: A man rides a red bicycle."
    assert build_prompt(f"<LANG_{lang.upper()}><TRANSLATE>", src="A man rides a red bicycle.") == expected
    assert prompt_for("translate", lang, src="A man rides a red bicycle.") == expected


def test_prompt_literals() -> None:
    # Written out once in full, independent of the tables above.
    assert build_prompt("<LANG_ZH><MORE_DETAILED_CAPTION>") == (
        "The target language is simplified Chinese. Describe with a paragraph what is shown in the image.")
    assert build_prompt("<LANG_FR><DETAILED_CAPTION>") == (
        "The target language is French. Describe in detail what is shown in the image.")
    assert build_prompt("<LANG_RU><TRANSLATE>", "Two dogs.") == (
        "The target language is Russian. Translate the following text: Two dogs.")


def test_prompt_without_language_and_tag_order() -> None:
    assert build_prompt("<CAPTION>") == "What does the image describe?"
    assert build_prompt("<TRANSLATE>", "x") == "Translate the following text: x"
    # The language sentence always comes first, whatever the tag order; whitespace around tags is allowed.
    expected = "The target language is Spanish. What does the image describe?"
    assert build_prompt("<CAPTION><LANG_ES>") == expected
    assert build_prompt(" <LANG_ES> <CAPTION> ") == expected


@pytest.mark.parametrize(
    ("tags", "src", "message"),
    [
        ("", None, "no task tag"),
        ("   ", None, "no task tag"),
        ("<LANG_DE>", None, "no task tag"),
        ("<FOO>", None, "unknown prompt tag '<FOO>'"),
        ("<LANG_IT><CAPTION>", None, "unknown prompt tag '<LANG_IT>'"),
        ("<lang_de><caption>", None, "must consist of tags"),
        ("<LANG_DE><CAPTION> a dog", None, "must consist of tags"),
        ("What does the image describe?", None, "must consist of tags"),
        ("<CAPTION><DETAILED_CAPTION>", None, "more than one task tag"),
        ("<LANG_DE><LANG_FR><CAPTION>", None, "more than one language tag"),
        ("<LANG_DE><TRANSLATE>", None, "needs a non-empty source text"),
        ("<LANG_DE><TRANSLATE>", "  ", "needs a non-empty source text"),
        ("<LANG_DE><CAPTION>", "A dog.", "only used with <TRANSLATE>"),
    ],
)
def test_bad_prompts(tags: str, src: str | None, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        build_prompt(tags, src)
    assert repr(tags) in str(err.value) or repr(src) in str(err.value)


def test_prompt_for_errors() -> None:
    with pytest.raises(ValueError, match="unknown task 'vqa'"):
        prompt_for("vqa", "de")
    with pytest.raises(ValueError, match="unknown language 'it'"):
        prompt_for("caption", "it")
    with pytest.raises(ValueError, match="unknown language 'DE'"):
        prompt_for("caption", "DE")
    with pytest.raises(ValueError, match="needs a non-empty source text"):
        prompt_for("translate", "de")


@pytest.mark.parametrize(
    ("lang", "text", "expected"),
    [
        ("en", "The image shows a dog on a beach.", "a dog on a beach."),
        ("de", "Das Bild zeigt einen Hund.", "einen Hund."),
        ("fr", "La photo montre un chien.", "un chien."),
        ("es", "La imagen muestra un perro.", "un perro."),
        ("ru", "На картинке изображен кот.", "кот."),
        ("zh", "图为一只狗。", "一只狗。"),
        ("en", "  The image shows  two cats", "two cats"),
        ("en", "The image shows", ""),
        ("en", "A dog. The image shows", "A dog. The image shows"),  # only at the start
        ("de", "The image shows a dog.", "The image shows a dog."),  # another language's prefix stays
        ("en", "The image showsa dog", "The image showsa dog"),  # not at a word boundary
        ("ru", "На картинке изображена собака.", "На картинке изображена собака."),
    ],
)
def test_strip_prefix(lang: str, text: str, expected: str) -> None:
    assert strip_prefix(text, lang) == expected


def test_strip_prefix_unknown_language() -> None:
    with pytest.raises(ValueError, match="unknown language 'it'"):
        strip_prefix("x", "it")


# --------------------------------------------------------------------------------------- sequences

def test_encode_prompt(enc_tok: TextTokenizer) -> None:
    prompt = prompt_for("caption", "de")
    ids = encode_prompt(enc_tok, prompt)
    assert ids == [0, *enc_tok.encode(prompt), 2]
    assert enc_tok.decode(ids) == prompt
    assert enc_tok.decode(ids, skip_special_tokens=False) == f"<s>{prompt}</s>"


def test_encode_prompt_truncates_to_128_including_specials(enc_tok: TextTokenizer) -> None:
    prompt = build_prompt("<LANG_DE><TRANSLATE>", "A dog runs on the beach. " * 60)
    body = enc_tok.encode(prompt)
    assert len(body) > 200
    ids = encode_prompt(enc_tok, prompt)
    assert len(ids) == 128
    assert ids == [0, *body[:126], 2]
    assert encode_prompt(enc_tok, prompt, max_len=5) == [0, *body[:3], 2]


def test_encode_prompt_exact_fit_is_not_cut(enc_tok: TextTokenizer) -> None:
    prompt = "A dog runs on the beach."
    body = enc_tok.encode(prompt)
    assert encode_prompt(enc_tok, prompt, max_len=len(body) + 2) == [0, *body, 2]
    assert encode_prompt(enc_tok, prompt, max_len=len(body) + 1) == [0, *body[:-1], 2]


@pytest.mark.parametrize("prompt", ["", "   ", "\n"])
def test_encode_prompt_empty(enc_tok: TextTokenizer, prompt: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"empty encoder prompt {prompt!r}")):
        encode_prompt(enc_tok, prompt)


def test_max_len_too_small(enc_tok: TextTokenizer, dec_tok: TextTokenizer) -> None:
    with pytest.raises(ValueError, match="max_len must be at least 3"):
        encode_prompt(enc_tok, "a dog", max_len=2)
    with pytest.raises(ValueError, match="max_len must be at least 3"):
        make_labels(dec_tok, "a dog", max_len=2)


def test_make_labels(dec_tok: TextTokenizer) -> None:
    text = "Das Bild zeigt einen Hund."
    labels = make_labels(dec_tok, text)
    assert labels == [2, *dec_tok.encode(text), 1]
    assert dec_tok.decode(labels) == text


def test_make_labels_truncates_keeping_eos(dec_tok: TextTokenizer) -> None:
    text = "The image shows a dog running on the beach. " * 80
    body = dec_tok.encode(text)
    assert len(body) > 200
    labels = make_labels(dec_tok, text)
    assert len(labels) == 128
    assert labels == [2, *body[:126], 1]


@pytest.mark.parametrize("text", ["", "  "])
def test_make_labels_empty(dec_tok: TextTokenizer, text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"empty decoder target {text!r}")):
        make_labels(dec_tok, text)


def test_shift_right_spec() -> None:
    # SPEC §6: labels [bos, t1..tn, eos] -> decoder input [eos, bos, t1..tn].
    assert shift_right([2, 10, 11, 12, 1]) == [1, 2, 10, 11, 12]
    assert shift_right([2, 1]) == [1, 2]
    assert shift_right([7, 8, 9], start_id=5, pad_id=4) == [5, 7, 8]
    assert shift_right([2, 10, 1, -100, -100]) == [1, 2, 10, 1, 0]


def test_shift_right_tensor_batch() -> None:
    labels = pad_labels([[2, 10, 1], [2, 10, 11, 12, 1]])
    expected = torch.tensor([[1, 2, 10, 1, 0], [1, 2, 10, 11, 12]])
    out = shift_right(labels)
    assert out.dtype == torch.long
    assert torch.equal(out, expected)
    assert torch.equal(labels, torch.tensor([[2, 10, 1, -100, -100], [2, 10, 11, 12, 1]]))  # input untouched
    assert torch.equal(shift_right(labels[1]), expected[1])


def test_shift_right_with_real_labels(dec_tok: TextTokenizer) -> None:
    body = dec_tok.encode("a dog")
    labels = make_labels(dec_tok, "a dog")
    assert shift_right(labels, start_id=dec_tok.eos_id, pad_id=dec_tok.pad_id) == [1, 2, *body]


def test_shift_right_empty() -> None:
    with pytest.raises(ValueError, match="cannot shift empty labels"):
        shift_right([])
    with pytest.raises(ValueError, match="cannot shift empty labels"):
        shift_right(torch.zeros(2, 0, dtype=torch.long))


def test_pad_batch() -> None:
    ids, mask = pad_batch([[0, 5, 6, 2], [0, 7, 2], [0, 2]], pad_value=1)
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    assert torch.equal(ids, torch.tensor([[0, 5, 6, 2], [0, 7, 2, 1], [0, 2, 1, 1]]))
    assert torch.equal(mask, torch.tensor([[True, True, True, True], [True, True, True, False],
                                           [True, True, False, False]]))


def test_pad_batch_with_empty_row_and_errors() -> None:
    ids, mask = pad_batch([[], [3]], pad_value=0)
    assert torch.equal(ids, torch.tensor([[0], [3]]))
    assert torch.equal(mask, torch.tensor([[False], [True]]))
    with pytest.raises(ValueError, match="cannot pad an empty batch"):
        pad_batch([], pad_value=0)


def test_pad_labels() -> None:
    out = pad_labels([[2, 9, 1], [2, 1]])
    assert out.dtype == torch.long
    assert torch.equal(out, torch.tensor([[2, 9, 1], [2, 1, IGNORE_INDEX]]))
    assert IGNORE_INDEX == -100


def test_fixture_files_are_plain_tokenizer_json(tmp_path: Path) -> None:
    # Others reuse the fixtures as stand-ins for HF repo directories: one tokenizer.json, valid JSON.
    for make in (make_gemma_like_tokenizer, make_bart_like_tokenizer):
        d = make(tmp_path / make.__name__)
        assert sorted(p.name for p in d.iterdir()) == ["tokenizer.json"]
        assert json.loads((d / "tokenizer.json").read_text())["model"]["type"] == "BPE"
