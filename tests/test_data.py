"""Training data: the synthetic multilingual set, readers, the greedy balancer, the pipeline and bad data."""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from florenz_fast.config import get_config
from florenz_fast.data import (
    Annotation,
    DataPipeline,
    DataStats,
    EncodedExample,
    GreedyBalancer,
    Record,
    Scene,
    ShapeGroup,
    add_caption_prefix,
    build_synthetic_tokenizers,
    describe_scene,
    load_record_image,
    read_manifest,
    read_tar_shards,
    synthetic_records,
    synthetic_scene,
    tokenizer_corpus,
)
from florenz_fast.text import MAX_TEXT_LEN, prompt_for, strip_prefix

SIZE = 64  # the `tiny` preset's image size


@pytest.fixture(scope="module")
def records() -> list[Record]:
    return synthetic_records(40, seed=0, image_size=SIZE)


@pytest.fixture(scope="module")
def toks(records, tmp_path_factory):
    return build_synthetic_tokenizers(tmp_path_factory.mktemp("tok"), records)


def take(pipeline: DataPipeline, n: int) -> list[EncodedExample]:
    it = iter(pipeline)
    return [next(it) for _ in range(n)]


def assert_same_examples(a: list[EncodedExample], b: list[EncodedExample]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.key == y.key and x.prompt_ids == y.prompt_ids and x.labels == y.labels
        assert torch.equal(x.pixels, y.pixels)


def png(color, size=(40, 30)) -> Image.Image:
    im = Image.new("RGB", size, color)
    im.putpixel((3, 4), (0, 0, 0))
    return im


# -------------------------------------------------------------------------------------------- synthetic

def test_synthetic_records_are_deterministic_in_the_seed(records, toks):
    again = synthetic_records(40, seed=0, image_size=SIZE)
    other = synthetic_records(40, seed=1, image_size=SIZE)
    assert [(r.name, r.annotations, r.image) for r in again] == [(r.name, r.annotations, r.image) for r in records]
    assert sum(a.image != b.image for a, b in zip(records, other)) >= 35
    assert sum(a.annotations != b.annotations for a, b in zip(records, other)) >= 35
    im = load_record_image(records[0].image)
    assert im.size == (SIZE, SIZE) and im.mode == "RGB"
    assert load_record_image(synthetic_records(1, 0, 224)[0].image).size == (224, 224)
    # The same texts at another image size: the scene depends on (seed, index) only.
    assert [r.annotations for r in synthetic_records(5, 0, 224)] == [r.annotations for r in records[:5]]

    enc, dec = toks
    first = take(DataPipeline(records, enc, dec, SIZE, seed=0), 30)
    assert_same_examples(first, take(DataPipeline(again, enc, dec, SIZE, seed=0), 30))
    shuffled = take(DataPipeline(records, enc, dec, SIZE, seed=1), 30)
    assert sum(not torch.equal(x.pixels, y.pixels) for x, y in zip(first, shuffled)) >= 25
    # every epoch visits every image once, in a fresh order
    pipe = DataPipeline(records, enc, dec, SIZE, seed=0)
    epochs = [[ex.pixels.numpy().tobytes() for ex in take(pipe, len(records))] for _ in range(2)]
    assert len(set(epochs[0])) == len(records) and sorted(epochs[0]) == sorted(epochs[1])
    assert sum(a != b for a, b in zip(*epochs)) >= 35


def test_withheld_languages_have_translations_but_no_captions(records):
    for rec in records:
        keys = Counter(a.key for a in rec.annotations)
        assert keys == Counter({"caption-en": 1, "caption-de": 1, "detailed_caption-en": 1,
                                "detailed_caption-de": 1, "translate-de": 2, "translate-fr": 2, "translate-es": 2})
        english = {a.target for a in rec.annotations if a.lang == "en" and a.task != "translate"}
        german = {a.target for a in rec.annotations if a.lang == "de" and a.task != "translate"}
        for a in rec.annotations:
            assert (a.source is not None) == (a.task == "translate")
            if a.task == "translate":
                assert a.source in english  # a translation of this image's English caption
                if a.lang == "de":
                    assert a.target in german
    only_en = synthetic_records(3, seed=0, image_size=SIZE, caption_langs=("en",), detailed=False)
    assert [sorted(a.key for a in r.annotations) for r in only_en] == [
        ["caption-en", "translate-de", "translate-es", "translate-fr"]] * 3
    with pytest.raises(ValueError, match="no grammar"):
        synthetic_records(1, 0, SIZE, langs=("en", "ru"))


def test_word_order_and_agreement_differ_between_languages():
    scene = Scene((ShapeGroup("circle", "red", 1, "left", "large"), ShapeGroup("star", "blue", 2, "right", "small")))
    short = {lang: describe_scene(scene, lang) for lang in ("en", "de", "fr", "es")}
    assert short == {
        "en": "A red circle on the left and two blue stars on the right.",
        "de": "Links ist ein roter Kreis und rechts sind zwei blaue Sterne.",  # position first, verb second
        "fr": "Un cercle rouge à gauche et deux étoiles bleues à droite.",  # colour after the noun
        "es": "A la izquierda hay un círculo rojo y a la derecha hay dos estrellas azules.",
    }
    detailed = {lang: describe_scene(scene, lang, detailed=True) for lang in ("en", "de", "fr", "es")}
    assert detailed == {
        "en": "There are three shapes on a white background. On the left there is a large red circle. "
              "On the right there are two small blue stars.",
        "de": "Auf einem weißen Hintergrund sind drei Formen zu sehen. Links ist ein großer roter Kreis. "
              "Rechts sind zwei kleine blaue Sterne.",
        "fr": "Il y a trois formes sur un fond blanc. À gauche, il y a un grand cercle rouge. "
              "À droite, il y a deux petites étoiles bleues.",  # size before the noun, colour after
        "es": "Hay tres formas sobre un fondo blanco. A la izquierda hay un círculo rojo grande. "
              "A la derecha hay dos estrellas azules pequeñas.",  # both after the noun
    }
    # Gender and number agreement.
    one = lambda shape, colour, lang, n=1: describe_scene(Scene((ShapeGroup(shape, colour, n, "top"),)), lang)
    assert one("diamond", "yellow", "de") == "Oben ist eine gelbe Raute."
    assert one("square", "black", "de") == "Oben ist ein schwarzes Quadrat."
    assert one("star", "green", "fr") == "Une étoile verte en haut."
    assert one("star", "yellow", "es", 3) == "Arriba hay tres estrellas amarillas."
    # Over many random scenes: the colour precedes the noun in English and German, follows it in fr and es.
    colour_word = {"en": "red", "de": "rot", "fr": "roug", "es": "roj"}
    noun_word = {"en": "circle", "de": "Kreis", "fr": "cercle", "es": "círculo"}
    checked = 0
    for i in range(200):
        scene, _ = synthetic_scene(0, i)
        if len(scene.groups) == 1 and scene.groups[0].shape == "circle" and scene.groups[0].colour == "red":
            for lang in ("en", "de", "fr", "es"):
                text = describe_scene(scene, lang)
                before = text.index(colour_word[lang]) < text.index(noun_word[lang])
                assert before == (lang in ("en", "de")), (lang, text)
            checked += 1
    assert checked >= 2


# ---------------------------------------------------------------------------------------------- balancer

def test_greedy_balancer_converges_to_uniform_key_shares_and_resumes():
    # 75% of images offer every key (translations twice), 25% only caption-en and translate-de (twice):
    # drawing one annotation uniformly gives shares 0.05..0.35; the balancer must get all five to 1/5.
    rich = ["caption-en", "caption-de", "translate-de", "translate-fr", "translate-es", "translate-de",
            "translate-fr", "translate-es"]
    poor = ["caption-en", "translate-de", "translate-de"]
    rng = random.Random(0)
    visits = [rich if rng.random() < 0.75 else poor for _ in range(2000)]
    bal, naive = GreedyBalancer(seed=0), Counter()
    worst = 0.0
    for i, cands in enumerate(visits):
        bal.choose(cands)
        naive[cands[rng.randrange(len(cands))]] += 1
        if i >= 50:
            worst = max(worst, max(abs(c - (i + 1) / 5) for c in bal.counts.values()))
    assert len(bal.counts) == 5
    assert all(abs(c - 400) <= 5 for c in bal.counts.values()), bal.counts
    assert worst <= 12, worst  # never drifts, not only at the end
    assert max(abs(c / 2000 - 0.2) for c in naive.values()) > 0.1  # the test can tell balancing from none

    # state round-trips through JSON and continues with the identical choices
    a = GreedyBalancer(["caption-en"], seed=3)
    for cands in visits[:300]:
        a.choose(cands)
    b = GreedyBalancer(seed=99)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert [a.choose(c) for c in visits[300:600]] == [b.choose(c) for c in visits[300:600]]
    assert a.state_dict() == b.state_dict()
    # weights: under-share keys 1, others 1e-6; a key seen for the first time joins the target
    c = GreedyBalancer(["x", "y"])
    for _ in range(4):
        c.choose(["x"])
    assert c.weights(["x", "y", "z"]) == [1e-6, 1.0, 1.0]


# ---------------------------------------------------------------------------------------------- pipeline

def test_pipeline_examples_follow_the_sequence_conventions(records, toks):
    enc, dec = toks
    pipe = DataPipeline(records, enc, dec, SIZE, seed=0)
    triples = {(a.key, prompt_for(a.task, a.lang, a.source), a.target) for r in records for a in r.annotations}
    for ex in take(pipe, 60):
        assert ex.pixels.shape == (3, SIZE, SIZE) and ex.pixels.dtype == torch.float32
        assert ex.prompt_ids[0] == 0 and ex.prompt_ids[-1] == 2 and len(ex.prompt_ids) <= MAX_TEXT_LEN
        assert ex.labels[0] == 2 and ex.labels[-1] == 1 and len(ex.labels) <= MAX_TEXT_LEN
        assert (ex.key, enc.decode(ex.prompt_ids), dec.decode(ex.labels)) in triples
    assert pipe.stats.n_used == 60 and not pipe.stats.skipped

    prefixed = DataPipeline(records, enc, dec, SIZE, seed=0, caption_prefix=True)
    seen = set()
    for ex in take(prefixed, 80):
        text, lang = dec.decode(ex.labels), ex.key.rsplit("-", 1)[1]
        if ex.key.startswith("translate"):
            assert not text.startswith(("Das Bild", "The image"))
        else:
            seen.add(lang)
            assert strip_prefix(text, lang) != text
    assert seen == {"en", "de"}
    assert add_caption_prefix("Links ist ein roter Kreis.", "de") == "Das Bild zeigt links ist ein roter Kreis."
    assert add_caption_prefix("Kreise.", "de") == "Das Bild zeigt Kreise."  # German nouns keep their capital
    assert add_caption_prefix("A red circle.", "en") == "The image shows a red circle."


def test_pipeline_resumes_the_identical_stream(records, toks, tmp_path):
    enc, dec = toks
    # 16 records, one with a missing image: 13 + 30 examples cross two epoch boundaries and the bad record.
    recs = records[:15] + [Record(tmp_path / "gone.png", [Annotation("caption", "en", "A cat.")], "gone")]
    first = DataPipeline(recs, enc, dec, SIZE, seed=7)
    take(first, 13)
    state = json.loads(json.dumps(first.state_dict()))  # plain JSON data
    continued = take(first, 30)
    resumed = DataPipeline(recs, enc, dec, SIZE, seed=7)
    resumed.load_state_dict(state)
    assert_same_examples(continued, take(resumed, 30))
    assert resumed.state_dict() == first.state_dict()
    assert first.stats.skipped == Counter({"missing_image": 1})  # counted once, not once per epoch
    assert first.epoch >= 2
    # a state from other data, or another seed, is refused rather than silently misapplied
    with pytest.raises(ValueError, match="different records"):
        DataPipeline(records[:15], enc, dec, SIZE, seed=7).load_state_dict(state)
    with pytest.raises(ValueError, match="different records"):
        DataPipeline(recs, enc, dec, SIZE, seed=8).load_state_dict(state)
    # the balancer inside the pipeline keeps the synthetic keys balanced
    counts = Counter(ex.key for ex in take(DataPipeline(records, enc, dec, SIZE, seed=0), 140))
    assert set(counts.values()) == {20}, counts


# ----------------------------------------------------------------------------------------------- readers

def test_manifest_groups_rows_by_image(tmp_path, toks):
    enc, dec = toks
    (tmp_path / "img").mkdir()
    png("red").save(tmp_path / "img" / "a.png")
    png("blue").save(tmp_path / "img" / "b.jpg", quality=95)
    rows = [
        {"image": "img/a.png", "task": "caption", "lang": "en", "source": None, "target": "A red picture."},
        {"image": "img/b.jpg", "task": "caption", "lang": "de", "target": "Ein blaues Bild."},
        {"image": "./img/../img/a.png", "task": "translate", "lang": "fr", "source": "A red picture.",
         "target": "Une image rouge."},
        {"image": str(tmp_path / "img" / "a.png"), "task": "<DETAILED_CAPTION>", "lang": "<LANG_DE>",
         "target": "Ein rotes Bild mit einem Punkt."},  # absolute path, tag spellings
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n")
    recs = read_manifest(path)
    assert [Path(r.image) for r in recs] == [tmp_path / "img" / "a.png", tmp_path / "img" / "b.jpg"]
    assert [a.key for a in recs[0].annotations] == ["caption-en", "translate-fr", "detailed_caption-de"]
    assert recs[0].annotations[1].source == "A red picture." and recs[0].annotations[0].source is None
    assert [a.key for a in recs[1].annotations] == ["caption-de"]
    assert recs.stats.n_skipped == 0
    pipe = DataPipeline(recs, enc, dec, SIZE, seed=0)
    exs = take(pipe, 20)
    assert {e.key for e in exs} == {"caption-en", "translate-fr", "detailed_caption-de", "caption-de"}
    assert all(e.pixels.shape == (3, SIZE, SIZE) for e in exs)


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _bytes(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def test_tar_shards_group_members_by_key(tmp_path, toks):
    enc, dec = toks
    red, green = png("red"), png("green", (20, 50))
    ann = lambda task, lang, target, source=None: {"task": task, "lang": lang, "target": target, "source": source}
    shard0 = _tar(tmp_path / "shard-000.tar", [
        ("s0.png", _bytes(red, "PNG")),
        ("s0.json", json.dumps([ann("caption", "en", "Red."), ann("translate", "es", "Rojo.", "Red.")]).encode()),
        ("s0.txt", b"ignored extra member"),
        ("dir/s1.json", json.dumps(ann("caption", "de", "Grün.")).encode()),  # json before image is fine
        ("dir/s1.jpg", _bytes(green, "JPEG")),
    ])
    shard1 = _tar(tmp_path / "shard-001.tar", [
        ("s2.png", _bytes(green, "PNG")),
        ("s2.json", json.dumps({"annotations": [ann("caption", "en", "Green.")]}).encode()),
    ])
    stream = read_tar_shards([shard0, str(shard1)])
    recs = list(stream)
    assert [r.name for r in recs] == [f"{shard0}:s0.png", f"{shard0}:dir/s1.jpg", f"{shard1}:s2.png"]
    assert [[a.key for a in r.annotations] for r in recs] == [["caption-en", "translate-es"], ["caption-de"],
                                                               ["caption-en"]]
    assert recs[0].annotations[1].source == "Red."
    assert load_record_image(recs[0].image).tobytes() == red.tobytes()  # lossless PNG
    assert load_record_image(recs[1].image).size == (20, 50)
    assert stream.stats.n_skipped == 0
    exs = take(DataPipeline(read_tar_shards(shard1), enc, dec, SIZE), 3)
    assert [e.key for e in exs] == ["caption-en"] * 3


# ---------------------------------------------------------------------------------------------- bad data

def test_bad_data_is_skipped_counted_and_reported(tmp_path, toks):
    enc, dec = toks
    png("red").save(tmp_path / "good.png")
    png("blue").save(tmp_path / "good2.jpg")
    jpeg = _bytes(png("green", (64, 64)), "JPEG")
    (tmp_path / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "notimage.png").write_bytes(b"this is not a png")
    long_target = " ".join(["Ein sehr langer Satz über rote Kreise."] * 40)
    lines = [
        json.dumps({"image": "good.png", "task": "caption", "lang": "en", "target": "A red picture."}),  # 1 ok
        json.dumps({"image": "missing.png", "task": "caption", "lang": "en", "target": "Gone."}),  # 2 missing
        json.dumps({"image": "truncated.jpg", "task": "caption", "lang": "de", "target": "Kaputt."}),  # 3
        json.dumps({"image": "good.png", "task": "caption", "lang": "de", "target": "   "}),  # 4 empty text
        json.dumps({"image": "good.png", "task": "caption", "lang": "xx", "target": "Hm."}),  # 5 unknown lang
        json.dumps({"image": "good.png", "task": "summarize", "lang": "en", "target": "Hm."}),  # 6 unknown task
        '{"image": "good.png", "task": "caption", "lang": ',  # 7 malformed JSON
        json.dumps({"image": "good2.jpg", "task": "translate", "lang": "fr", "target": "Bleu."}),  # 8 no source
        json.dumps({"image": "good2.jpg", "task": "translate", "lang": "fr", "source": "Blue.",
                    "target": "Une image bleue."}),  # 9 ok
        json.dumps({"image": "good.png", "task": "caption", "lang": "de", "target": long_target}),  # 10 truncated
        json.dumps([1, 2]),  # 11 not an object
        json.dumps({"task": "caption", "lang": "en", "target": "No image."}),  # 12 no image field
        json.dumps({"image": "notimage.png", "task": "caption", "lang": "en", "target": "Not an image."}),  # 13
    ]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    manifest.write_bytes(manifest.read_bytes() + b'{"image": "good.png", "target": "\xff\xfe"}\n')  # 14 bad UTF-8
    recs = read_manifest(manifest)
    assert recs.stats.skipped == Counter({"bad_json": 2, "empty_target": 1, "unknown_lang": 1, "unknown_task": 1,
                                          "missing_source": 1, "missing_field": 1, "bad_encoding": 1})
    report = recs.stats.report()
    for lineno in (4, 5, 6, 7, 8, 11, 12, 14):
        assert f"{manifest}:{lineno} " in report, (lineno, report)

    pipe = DataPipeline(recs, enc, dec, SIZE, seed=0)
    exs = take(pipe, 40)  # never raises
    assert Counter(e.key for e in exs).keys() == {"caption-en", "caption-de", "translate-fr"}
    assert pipe.stats.skipped == recs.stats.skipped + Counter({"missing_image": 1, "corrupt_image": 2})
    assert pipe.stats.notes["truncated_target"] >= 1
    truncated = [e for e in exs if len(e.labels) == MAX_TEXT_LEN]
    assert truncated and all(e.labels[-1] == 1 and e.key == "caption-de" for e in truncated)
    report = pipe.stats.report()
    for name in ("missing.png", "truncated.jpg", "notimage.png", f"{manifest}:4", "truncated_target"):
        assert name in report, (name, report)
    assert "40 examples used" in report

    # the same in tar shards: corrupt image bytes, a sample without json, bad JSON, an unknown language tag
    good_ann = json.dumps({"task": "caption", "lang": "en", "target": "Red."}).encode()
    shard = _tar(tmp_path / "bad.tar", [
        ("ok.png", _bytes(png("red"), "PNG")), ("ok.json", good_ann),
        ("broken.jpg", jpeg[:200]), ("broken.json", good_ann),
        ("lonely.png", _bytes(png("red"), "PNG")),
        ("badjson.png", _bytes(png("red"), "PNG")), ("badjson.json", b"{not json"),
        ("lang.png", _bytes(png("red"), "PNG")),
        ("lang.json", json.dumps([{"task": "caption", "lang": "klingon", "target": "Q."},
                                  {"task": "caption", "lang": "de", "target": "Rot."}]).encode()),
    ])
    truncated_shard = tmp_path / "cut.tar"
    truncated_shard.write_bytes(shard.read_bytes()[:1500])
    stream = read_tar_shards([shard, tmp_path / "nope.tar", truncated_shard])
    pipe = DataPipeline(stream, enc, dec, SIZE, seed=0)  # the reader's counts travel into the pipeline
    exs = take(pipe, 20)
    assert {e.key for e in exs} == {"caption-en", "caption-de"}
    assert stream.stats.skipped == Counter({"missing_json": 1, "bad_json": 1, "unknown_lang": 1,
                                            "missing_shard": 1, "bad_shard": 1})
    assert pipe.stats.skipped == stream.stats.skipped + Counter({"corrupt_image": 1})
    report = pipe.stats.report()
    for name in (f"{shard}:broken.jpg", f"{shard}:lonely", f"{shard}:lang.json#0", "nope.tar", "cut.tar"):
        assert name in report, (name, report)

    # annotations built in code are checked too; a pipeline with nothing usable says so
    recs = [Record(png("red"), [Annotation("caption", "xx", "Hm."), Annotation("caption", "en", "Red.")], "mem")]
    pipe = DataPipeline(recs, enc, dec, SIZE)
    assert pipe.stats.skipped == Counter({"unknown_lang": 1}) and take(pipe, 1)[0].key == "caption-en"
    with pytest.raises(ValueError, match="no usable records"):
        DataPipeline([Record(png("red"), [Annotation("caption", "en", "")], "empty")], enc, dec, SIZE)
    with pytest.raises(RuntimeError, match="whole epoch"):
        take(DataPipeline([Record(tmp_path / "missing.png", [Annotation("caption", "en", "X.")])], enc, dec, SIZE), 1)


def test_stats_round_trip_and_report():
    s = DataStats()
    for i in range(7):
        s.skip("corrupt_image", f"img{i}.jpg", "truncated")
    s.use("caption-en", 3)
    s.note("truncated_target", "m.jsonl:3")
    t = DataStats.from_dict(json.loads(json.dumps(s.as_dict())))
    assert t.as_dict() == s.as_dict() and t.n_used == 3 and t.n_skipped == 7
    report = t.report()
    assert "img0.jpg (truncated)" in report and "2 more" in report and "img6.jpg" not in report
    assert "truncated_target (noted 1): m.jsonl:3" in report


# -------------------------------------------------------------------------------------------- tokenizers

def test_synthetic_tokenizers_have_spec_ids_fit_tiny_and_round_trip(records, toks, tmp_path):
    enc, dec = toks
    tiny = get_config("tiny")
    assert enc.vocab_size <= tiny.encoder.vocab_size == 512
    assert dec.vocab_size <= tiny.decoder.vocab_size == 512
    assert [enc.backend.token_to_id(t) for t in ("<s>", "<pad>", "</s>")] == [0, 1, 2]
    assert [dec.backend.token_to_id(t) for t in ("<pad>", "<eos>", "<bos>")] == [0, 1, 2]
    assert (enc.bos_id, enc.pad_id, enc.eos_id, dec.pad_id, dec.eos_id, dec.bos_id) == (0, 1, 2, 0, 1, 2)
    enc_texts, dec_texts = tokenizer_corpus(records)
    big = synthetic_records(300, seed=5, image_size=8)  # texts the tokenizers were not trained on
    more_enc, more_dec = tokenizer_corpus(big)
    byte_ids = {dec.backend.token_to_id(f"<0x{b:02X}>") for b in range(256)}
    for text in set(enc_texts + more_enc):
        ids = enc.encode(text)
        assert enc.decode(ids) == text and max(ids) < enc.vocab_size and min(ids) > 3
    for text in set(dec_texts + more_dec):
        ids = dec.encode(text)
        assert dec.decode(ids) == text and max(ids) < dec.vocab_size and min(ids) > 3
        assert not byte_ids & set(ids)  # the synthetic alphabet is in the vocabulary, no byte fallback
    for text in ("На картинке изображен кот", "图为一只狗", "  odd  spacing "):  # anything else still round-trips
        assert dec.decode(dec.encode(text)) == text and enc.decode(enc.encode(text)) == text
    # compact enough that a 128-token budget is never hit by the synthetic texts
    assert max(len(dec.encode(t)) for t in more_dec) < 100 and max(len(enc.encode(t)) for t in more_enc) < 100
    # deterministic: the same records give byte-identical tokenizer files
    build_synthetic_tokenizers(tmp_path / "again", records)
    assert enc.path is not None and dec.path is not None
    assert (tmp_path / "again/encoder/tokenizer.json").read_bytes() == (enc.path / "tokenizer.json").read_bytes()
    assert (tmp_path / "again/decoder/tokenizer.json").read_bytes() == (dec.path / "tokenizer.json").read_bytes()
