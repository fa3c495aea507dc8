"""Evaluation metrics and readers, the generate / eval command lines, and their errors (CPU, tiny model)."""

from __future__ import annotations

import gzip
import json
import math

import pytest
import sacrebleu
import torch
from PIL import Image

from florenz_fast import eval as ev
from florenz_fast import generate as gen_mod
from florenz_fast.config import get_config
from florenz_fast.convert import save_pretrained
from florenz_fast.florenz import Florenz
from florenz_fast.text import train_decoder_tokenizer, train_encoder_tokenizer

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

TEXTS = ["a red circle on the left", "ein roter Kreis links", "un cercle rouge", "un círculo rojo",
         "красный круг", "红色的圆", "The target language is German. What does the image describe?",
         "Translate the following text: a red circle", "Das Bild zeigt", "The image shows"]


# ---- metrics ---------------------------------------------------------------------------------------------


def test_bleu_and_chrf_equal_sacrebleu():
    hyps = ["A man rides a red bike.", "Two dogs play in the snow", "Ein Mann fährt Fahrrad"]
    refs = [["A man is riding a red bicycle.", "A man rides a bike."], ["Two dogs are playing in snow."],
            ["Ein Mann fährt ein Fahrrad.", "Mann auf Fahrrad", "Ein Radfahrer"]]
    streams = [[r[i] if i < len(r) else None for r in refs] for i in range(3)]
    assert ev.bleu(hyps, refs, "de") == sacrebleu.corpus_bleu(hyps, streams, tokenize="13a").score
    assert ev.chrf(hyps, refs) == sacrebleu.corpus_chrf(hyps, streams).score
    zh_h, zh_r = ["一只狗在雪地里玩", "男人骑自行车"], [["一只狗在雪里玩耍"], ["一个男人在骑自行车"]]
    assert ev.bleu(zh_h, zh_r, "zh") == sacrebleu.corpus_bleu(zh_h, [[r[0] for r in zh_r]], tokenize="zh").score
    assert ev.bleu(zh_h, zh_r, "zh") != sacrebleu.corpus_bleu(zh_h, [[r[0] for r in zh_r]], tokenize="13a").score
    assert 0 < ev.bleu(hyps, refs, "en") < 100


def test_cider_d_hand_computed():
    # two images, every n-gram in one image only: idf = log 2 for all, so identical captions give cosine 1 for
    # n = 1, 2 and nothing for n = 3, 4 (no such n-grams): (1 + 1 + 0 + 0) / 4 * 10 = 5
    assert ev.cider_d(["a b", "c d"], [["a b"], ["c d"]]) == pytest.approx(5.0, abs=1e-12)
    # hypothesis "a" against "a b": n = 1 cosine 1/sqrt(2), length (bigrams) 0 vs 1 -> exp(-1 / 72)
    want = (10 * (1 / math.sqrt(2)) * math.exp(-1 / 72) / 4 + 5.0) / 2
    assert ev.cider_d(["a", "c d"], [["a b"], ["c d"]]) == pytest.approx(want, abs=1e-12)
    # an n-gram found in every image's references carries no weight (idf 0); clipping: "a a" vs "a b"
    # n = 1: hyp (a: 2w), ref (a: w, b: w) -> min(2w, w) * w / (2w * sqrt(2) w) = 1 / (2 sqrt 2)
    got = ev.cider_d(["a a", "c d"], [["a b"], ["c d"]])
    assert got == pytest.approx((10 * (1 / (2 * math.sqrt(2))) / 4 + 5.0) / 2, abs=1e-12)
    assert ev.cider_d(["a b"], [["a b"]]) == 0.0  # one image: every idf is log(1) - log(1) = 0
    assert ev.caption_tokens("A dog, running!") == ["a", "dog", "running"]
    assert ev.caption_tokens("一只狗。", "zh") == ["一", "只", "狗"]


def test_loss_groups_are_token_weighted():
    keys = ["caption-en", "caption-de", "caption-es", "translate-fr", "caption-zh", "translate-de"]
    out = ev.loss_groups(keys, [2.0, 6.0, 3.0, 4.0, 9.0, 1.0], [1, 3, 1, 2, 3, 1])
    assert out["in_distribution"] == pytest.approx(8.0 / 4)
    assert out["unseen"] == pytest.approx(12.0 / 4)
    assert out["translation"] == pytest.approx(5.0 / 3)
    assert out["per_key"]["caption-zh"] == pytest.approx(3.0)


class _FakePipe:
    """Perplexity looked up from the candidate text: CoMMuTE accuracy is then known by hand."""

    def __init__(self, ppl):
        self.ppl = ppl

    def score(self, triples, batch_size=16):
        return [{"perplexity": self.ppl[t[2]]} for t in triples]


def _write_commute(root, images):
    d = root / "en-de"
    d.mkdir(parents=True)
    (d / "src.en").write_text("he saw a bat\nhe saw a bat\nthe mouse is new\nthe mouse is grey\n")
    (d / "correct.de").write_text("Fledermaus A\nSchläger B\nMaus C\nMaus D\n")
    (d / "incorrect.de").write_text("Schläger A\nFledermaus B\nTiermaus C\nComputermaus D\n")
    (d / "img.de").write_text("\n".join(images) + "\n")


def test_commute_accuracy_hand_made(tmp_path):
    _write_commute(tmp_path, ["0.png", "1.png", "0.png", "1.png"])
    items = ev.read_commute(tmp_path, "de")
    assert [it.image.name for it in items] == ["0.png", "1.png", "0.png", "1.png"]
    ppl = {"Fledermaus A": 2.0, "Schläger A": 3.0,  # right
           "Schläger B": 5.0, "Fledermaus B": 4.0,  # wrong
           "Maus C": 1.5, "Tiermaus C": 9.0,  # right
           "Maus D": 7.0, "Computermaus D": 7.0}  # a tie is not a win
    res = ev.commute_accuracy(_FakePipe(ppl), items, "de")
    assert res == {"accuracy": 0.5, "items": 4, "correct": 2}


def test_readers_and_their_errors(tmp_path):
    raw, splits = tmp_path / "raw", tmp_path / "image_splits"
    raw.mkdir(), splits.mkdir()
    (raw / "test_2016_flickr.en").write_text("a dog\na cat\n")
    with gzip.open(raw / "test_2016_flickr.de.gz", "wt") as f:  # published files are gzipped
        f.write("ein Hund\neine Katze\n")
    (splits / "test_2016_flickr.txt").write_text("1.jpg\n2.jpg\n")
    items = ev.read_multi30k_task1(tmp_path, "test_2016_flickr", "de", tmp_path / "img")
    assert [(it.src, it.refs, it.image.name) for it in items] == [("a dog", ["ein Hund"], "1.jpg"),
                                                                  ("a cat", ["eine Katze"], "2.jpg")]
    (splits / "test_2016_flickr.txt").write_text("1.jpg\n")
    with pytest.raises(ValueError, match="line count"):
        ev.read_multi30k_task1(tmp_path, "test_2016_flickr", "de", tmp_path / "img")
    with pytest.raises(FileNotFoundError, match="test_2016_flickr.fr"):
        ev.read_multi30k_task1(tmp_path, "test_2016_flickr", "fr", tmp_path / "img")
    bad = tmp_path / "xm.jsonl"
    bad.write_text('{"image/key": "k", "de": {"caption": ["x"]}}\n')
    with pytest.raises(ValueError, match=r"xm.jsonl:1.*'en'"):
        ev.read_xm3600(bad, tmp_path, "en")
    assert ev.read_xm3600(bad, tmp_path, "de")[0].refs == ["x"]


# ---- end to end on a tiny checkpoint ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = Florenz(get_config("tiny")).eval()
    ckpt = root / "model"
    save_pretrained(model, ckpt)
    train_encoder_tokenizer(ckpt / "tokenizers" / "encoder", TEXTS, 400)
    train_decoder_tokenizer(ckpt / "tokenizers" / "decoder", TEXTS, 400)
    for i, color in enumerate(["red", "blue"]):
        Image.new("RGB", (40, 30), color).save(root / f"{i}.png")
    return root, ckpt


def _run(main, argv, capsys):
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_generate_cli(tiny_ckpt, capsys):
    root, ckpt = tiny_ckpt
    batch = root / "batch.jsonl"
    batch.write_text(json.dumps({"image": "0.png", "task": "caption", "lang": "de", "id": "a"}) + "\n"
                     + json.dumps({"image": "1.png", "task": "translate", "lang": "fr", "src": "a red circle"}) + "\n")
    out = root / "out.jsonl"
    code, _, err = _run(gen_mod.main, [f"--ckpt={ckpt}", f"--batch={batch}", f"--out={out}", "--max_new_tokens=6",
                                       "--num_beams=2", "--prefix"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", None] and [r["lang"] for r in rows] == ["de", "fr"]
    assert all(isinstance(r["text"], str) and r["tokens"] <= 6 for r in rows)
    code, stdout, err = _run(gen_mod.main, [f"--ckpt={ckpt}", f"--image={root / '0.png'}", "--lang=en",
                                            "--max_new_tokens=4"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["task"] == "caption"


def test_generate_cli_errors(tiny_ckpt, capsys):
    root, ckpt = tiny_ckpt
    base = [f"--ckpt={ckpt}", "--max_new_tokens=3"]
    cases = [
        ([f"--image={root / 'missing.jpg'}"], "missing.jpg"),
        ([f"--image={root / '0.png'}", "--lang=xx"], "unknown language 'xx'"),
        ([f"--image={root / '0.png'}", "--preset=florenz-3.5b"], "preset 'tiny'"),
        ([f"--image={root / '0.png'}", "--task=translate"], "needs a non-empty 'src'"),
    ]
    empty = root / "empty.jsonl"
    empty.write_text("\n")
    cases.append(([f"--batch={empty}"], "empty.jsonl: empty batch"))
    badlang = root / "badlang.jsonl"
    badlang.write_text(json.dumps({"image": "0.png", "lang": "klingon"}) + "\n")
    cases.append(([f"--batch={badlang}"], "badlang.jsonl:1: unknown language 'klingon'"))
    badkey = root / "badkey.jsonl"
    badkey.write_text(json.dumps({"image": "0.png", "language": "de"}) + "\n")
    cases.append(([f"--batch={badkey}"], "badkey.jsonl:1: unknown key(s) ['language']"))
    for extra, message in cases:
        code, _, err = _run(gen_mod.main, base + extra, capsys)
        assert code == 2 and message in err, (extra, err)
    code, _, err = _run(gen_mod.main, [f"--ckpt={root / 'nope'}", f"--image={root / '0.png'}"], capsys)
    assert code == 2 and "nope" in err


def test_pipeline_score_and_commute(tiny_ckpt):
    root, ckpt = tiny_ckpt
    pipe = gen_mod.load_pipeline(ckpt)
    _write_commute(root / "commute", [str(root / "0.png"), str(root / "1.png")] * 2)
    items = ev.read_commute(root / "commute", "de")
    res = ev.commute_accuracy(pipe, items, "de", batch_size=3)
    from florenz_fast.text import prompt_for

    want = 0
    for it in items:  # the same decision, one candidate at a time
        p = prompt_for("translate", "de", it.src)
        a, b = pipe.score([(it.image, p, it.refs[0])])[0], pipe.score([(it.image, p, it.extra["incorrect"])])[0]
        want += a["perplexity"] < b["perplexity"]
    assert res["correct"] == want and res["items"] == 4


def test_eval_cli_end_to_end(tiny_ckpt, capsys):
    root, ckpt = tiny_ckpt
    t1 = root / "m30k" / "task1"
    (t1 / "raw").mkdir(parents=True), (t1 / "image_splits").mkdir()
    (t1 / "raw" / "test_2016_flickr.en").write_text("a red circle\na blue square\n")
    (t1 / "raw" / "test_2016_flickr.de").write_text("ein roter Kreis\nein blaues Quadrat\n")
    (t1 / "image_splits" / "test_2016_flickr.txt").write_text("0.png\n1.png\n")
    t2 = root / "m30k" / "task2"
    (t2 / "raw").mkdir(parents=True), (t2 / "image_splits").mkdir()
    for i in range(1, 6):
        for lang in ("en", "de"):
            (t2 / "raw" / f"test_2016.{i}.{lang}").write_text(f"caption {i} one\ncaption {i} two\n")
    (t2 / "image_splits" / "test_2016.txt").write_text("0.png\n1.png\n")
    xm = root / "xm.jsonl"
    xm.write_text("".join(json.dumps({"image/key": k, "zh": {"caption": ["红色的圆"]},
                                      "en": {"caption": ["a red circle", "red"]}}) + "\n" for k in ("0", "1")))
    (root / "xmimg").mkdir()
    for k in ("0", "1"):
        Image.new("RGB", (20, 20), "green").save(root / "xmimg" / f"{k}.jpg")
    karpathy = root / "karpathy.json"
    karpathy.write_text(json.dumps({"images": [
        {"filepath": "", "filename": "0.png", "split": "test", "sentences": [{"raw": "a red image"}]},
        {"filepath": "", "filename": "1.png", "split": "train", "sentences": [{"raw": "x"}]}]}))
    manifest = root / "val.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in [
        {"image": str(root / "0.png"), "task": "caption", "lang": "en", "target": "a red circle"},
        {"image": str(root / "1.png"), "task": "caption", "lang": "es", "target": "un círculo rojo"},
        {"image": str(root / "1.png"), "task": "translate", "lang": "fr", "source": "a red circle",
         "target": "un cercle rouge"}]))
    out = root / "report"
    code, stdout, err = _run(ev.main, [
        f"--ckpt={ckpt}", f"--out={out}", f"--multi30k={t1}", f"--flickr30k_images={root}",
        f"--multi30k_task2={t2}", f"--xm3600={xm}", f"--xm3600_images={root / 'xmimg'}",
        "--xm3600_langs=en,zh", f"--coco_karpathy={karpathy}", f"--coco_images={root}",
        f"--loss_manifest={manifest}", "--max_new_tokens=5", "--num_beams=2"], capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert set(report["translation"]) == {"multi30k/test_2016_flickr/en-de"}
    assert set(report["captioning"]) == {"multi30k-task2/en", "multi30k-task2/de", "xm3600/en", "xm3600/zh",
                                         "coco-karpathy/test"}
    assert report["captioning"]["coco-karpathy/test"]["n"] == 1
    groups = report["loss_groups"]
    assert groups["in_distribution"] > 0 and groups["unseen"] > 0 and groups["translation"] > 0
    assert "| multi30k/test_2016_flickr/en-de | BLEU |" in (out / "report.md").read_text()
    code, _, err = _run(ev.main, [f"--ckpt={ckpt}", f"--out={out}", f"--xm3600={xm}"], capsys)
    assert code == 2 and "--xm3600-images" in err


def test_pipeline_loads_a_released_directory(tiny_ckpt, tmp_path):
    """generate.load_pipeline takes a released-layout directory as it comes, and generates what our layout does."""
    import shutil

    from florenz_fast.convert import load_pretrained

    root, ckpt = tiny_ckpt
    released = tmp_path / "released"
    save_pretrained(load_pretrained(ckpt), released, layout="released")
    shutil.copytree(ckpt / "tokenizers", released / "tokenizers")
    assert "vision_config" in json.loads((released / "config.json").read_text())
    config = gen_mod.GenerationConfig(max_new_tokens=5, num_beams=2)
    ours = gen_mod.load_pipeline(ckpt, config=config)
    theirs = gen_mod.load_pipeline(released, preset="tiny", config=config)
    reqs = [gen_mod.Request(image=root / "0.png", task="caption", lang="de"),
            gen_mod.Request(image=root / "1.png", task="translate", lang="fr", src="a red circle")]
    got, want = theirs.generate(reqs), ours.generate(reqs)
    assert got == want and all(r["text"] is not None for r in got)
    with pytest.raises(ValueError, match="preset 'tiny'"):
        gen_mod.load_pipeline(released, preset="small")
