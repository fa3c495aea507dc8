"""florenz_fast.scaling.pipeline (issue 18): the three stages end to end in miniature (2 sizes x 2 budgets), the
checkpoints read by the importers and transformers, prepare's zero gates, resuming; the grounding score."""

import json
import random

import pytest
import torch

from florenz_fast.data.synthetic import SYNTHETIC_LANGS, describe_scene, sample_scene
from florenz_fast.scaling import pipeline, scenes


def test_grounding_scores_true_captions_one_and_others_lower():
    rng = random.Random(3)
    truth = [sample_scene(rng) for _ in range(40)]
    for lang in SYNTHETIC_LANGS:
        for detailed in (False, True):
            g = scenes.grounding([describe_scene(s, lang, detailed) for s in truth], truth, lang)
            assert g["accuracy"] == 1.0 and g["mentions_per_caption"] >= 2, (lang, g)
            assert g["chance"] < 0.6, (lang, g)  # the next scene's colours and shapes mostly differ
        # one caption for every image scores about chance; a caption in another language names nothing
        same = [describe_scene(truth[0], lang)] * len(truth)
        assert scenes.grounding(same, truth, lang)["accuracy"] < 0.6
    other = scenes.grounding([describe_scene(s, "de") for s in truth], truth, "es")
    assert other["mentions_per_caption"] == 0 and other["accuracy"] == 0.0
    with pytest.raises(ValueError, match="one per scene"):
        scenes.grounding(["a"], truth, "en")


def test_config_overrides_rebuild_the_joined_config():
    from florenz_fast.config import apply_overrides, get_config

    cfg = pipeline.PipelineConfig()
    for size in ("gemma-0.24m", "gemma-1.4m"):
        joined = pipeline.joined_config(cfg, size)
        rebuilt = apply_overrides(get_config("tiny"), pipeline.config_overrides(joined))
        assert rebuilt.to_dict() == joined.to_dict()
    assert pipeline.main(["--sizes=bart-0.64m"]) == 2
    assert pipeline.main(["--image_size=100"]) == 2


def test_colour_probe_fails_on_a_collapsed_tower(one_intra_op_thread):
    # the projection zeroed: every image gives the same tokens (what training the tower at the run's rate did),
    # and the probe must fall to chance or below while the intact tower stays above it
    from florenz_fast.florenz import Florenz

    cfg = pipeline.PipelineConfig(image_size=64, vision_width=8, florence_width=32, probe_images=200)
    torch.manual_seed(0)
    model = Florenz(pipeline.florence2_config(cfg))
    intact = pipeline.colour_probe(model, cfg)
    with torch.no_grad():
        model.projector.image_projection.weight.zero_()
    collapsed = pipeline.colour_probe(model, cfg)
    assert collapsed["spread"] < 1e-5 and collapsed["accuracy"] <= collapsed["chance"], collapsed
    assert intact["accuracy"] >= intact["chance"] + 0.1, intact


MINI = ["--image_size=64", "--vision_width=8", "--florence_width=32", "--a_steps=8", "--a_batch_size=8",
        "--a_tower_steps=20",
        "--probe_images=400", "--sizes=gemma-0.24m,gemma-0.67m", "--b_steps=6", "--b_batch_size=8",
        "--budgets=16,32", "--batch_size=8", "--c_images=24", "--eval_images=4", "--max_new_tokens=6",
        "--num_beams=1", "--bootstrap=3", "--threads=1"]


@pytest.mark.slow
def test_miniature_pipeline_end_to_end_and_resume(tmp_path, monkeypatch):
    from transformers import Gemma2ForCausalLM

    from florenz_fast.checkpoint import open_checkpoint
    from florenz_fast.convert import detect_florence2_layout, import_florence2, import_gemma2, load_pretrained
    from florenz_fast.florenz import Florenz
    from florenz_fast.scaling import main as scaling_main

    calls = []
    real = pipeline.train_run
    monkeypatch.setattr(pipeline, "train_run", lambda tc: calls.append(tc.out) or real(tc))
    out = tmp_path / "mini"
    args = MINI + [f"--out={out}"]
    # interrupted after the first stage-C run: stages A and B are finished, one run, no report
    assert scaling_main(["--pipeline=pretrained", *args, "--stop_after_runs=1"]) == 0
    assert len(calls) == 1 and not (out / "report.json").exists()
    cfg = pipeline.PipelineConfig(image_size=64, vision_width=8, florence_width=32)

    # stage A: a Microsoft-layout Florence-2 that import_florence2 reads, equal to what was trained
    a = json.loads((out / "stage_a" / "done.json").read_text())
    source = open_checkpoint(a["checkpoint"])
    assert detect_florence2_layout(source) == "microsoft"
    trained_a = load_pretrained(out / "stage_a" / "run" / "final")
    joined = Florenz(pipeline.joined_config(cfg, "gemma-0.24m"))
    assert import_florence2(joined, a["checkpoint"]) == "microsoft"
    for name, t in trained_a.state_dict().items():
        if name.startswith(("vision_tower.", "projector.", "encoder.")):
            assert torch.equal(joined.state_dict()[name], t), name
    # its tower tells the colour of a one-group scene apart better than chance (a collapsed tower, one vector
    # for every image, or a broken probe scores at chance)
    p = a["probe"]
    assert p["n_scored"] == 200 and p["accuracy"] >= p["chance"] + 0.1, p
    assert p["spread"] > 0.05 * p["common"], p  # the image tokens differ between images
    tw = a["tower_pretraining"]  # the tower and projector were pretrained on attributes, then frozen
    assert tw["steps"] == 20 and tw["images"] == 160 and tw["last_loss"] < tw["first_loss"], tw
    tower_init = load_pretrained(tw["path"]).state_dict()
    for name, t in trained_a.state_dict().items():
        if name.startswith(("vision_tower.", "projector.")):
            assert torch.equal(tower_init[name], t), name
    torch.manual_seed(0)  # the init the tower pretraining started from (seed 0): it moved
    assert not torch.equal(tower_init["projector.image_projection.weight"],
                           Florenz(trained_a.cfg).state_dict()["projector.image_projection.weight"])
    assert set(a["captions_en"]) >= {"grounding_accuracy", "grounding_chance", "distinct_share",
                                     "caption_loss_own_image", "caption_loss_other_image"}

    # stage B: a Hugging Face Gemma-2 directory: transformers loads it and computes our decoder's logits
    b_dir = out / "stage_b" / "gemma-0.24m" / "gemma2"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.name for f in b_dir.iterdir()}
    import_gemma2(joined, b_dir)
    joined.eval()
    ids = torch.randint(3, 500, (2, 12))
    hf = Gemma2ForCausalLM.from_pretrained(b_dir, attn_implementation="eager").eval()
    from florenz_fast.modules import Layout

    with torch.no_grad():
        ours = joined.logits(joined.decoder(ids, Layout(), torch.zeros(2, 1, 32), Layout()))
        theirs = hf(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)

    # prepare joined A and B (a subprocess, as a user runs it): zero gates, copied norms, both halves intact
    init = load_pretrained(out / "stage_c" / "init" / "gemma-0.24m")
    state = init.state_dict()
    gates = [v for k, v in state.items() if k.endswith("encoder_attn_gate")]
    assert len(gates) == init.cfg.decoder.layers and all(float(g) == 0.0 for g in gates)
    for i in range(init.cfg.decoder.layers):
        torch.testing.assert_close(state[f"decoder.layers.{i}.post_encoder_attention_layernorm.weight"],
                                   state[f"decoder.layers.{i}.post_attention_layernorm.weight"], rtol=0, atol=0)
    hf_state, a_state = hf.state_dict(), trained_a.state_dict()
    body = [k for k in state if k.startswith("decoder.") and ".encoder_attn" not in k and "post_encoder" not in k]
    assert body and all(torch.equal(state[k], hf_state["model." + k[len("decoder."):]]) for k in body)
    tower = [k for k in state if k.startswith(("vision_tower.", "projector."))]
    assert tower and all(torch.equal(state[k], a_state[k]) for k in tower)

    first = out / "stage_c" / "runs" / "gemma-0.24m-d16" / "eval.json"
    marks = {p: p.stat().st_mtime_ns for p in (first, out / "stage_a" / "done.json",
                                                out / "stage_b" / "gemma-0.67m" / "done.json")}
    # the rest: finished stages and the finished run are skipped, the three other runs train
    assert scaling_main(["--pipeline=pretrained", *args]) == 0
    assert len(calls) == 4 and all(p.stat().st_mtime_ns == m for p, m in marks.items())
    report = json.loads((out / "report.json").read_text())
    assert len(report["runs"]) == 4
    for r in report["runs"]:
        assert r["size"] in ("gemma-0.24m", "gemma-0.67m") and r["samples"] == r["budget"] and r["params"] > 0
        assert set(r["languages"]) == set(SYNTHETIC_LANGS)
        for lang, v in r["languages"].items():
            assert 0 < v["loss"] < 20 and 0 <= v["bleu"] <= 100, (r["run"], lang, v)
            for key in ("distinct_share", "in_language_share", "grounding_accuracy", "grounding_chance"):
                assert 0 <= v[key] <= 1, (r["run"], lang, key, v)
            # grounding's attribute mentions per caption, as the run's evaluation recorded them
            assert v["mentions_per_caption"] == r["captions"][lang]["mentions_per_caption"] >= 0
        for g in ("in_distribution", "unseen", "translation"):
            assert 0 < r["loss_groups"][g] < 20
    assert report["runs"][0]["params"] < report["runs"][-1]["params"]  # N = the Gemma decoder's parameters
    assert "skipped" in report["fits"]["unseen"]  # 4 runs: too few for a 5-constant fit
    assert set(report["summary"]["grounding"]) == {"in_distribution", "unseen", "chance_in_distribution",
                                                   "chance_unseen", "mentions_per_caption_in_distribution",
                                                   "mentions_per_caption_unseen"}
    assert 0 <= report["summary"]["in_language_share_unseen"] <= 1
    md = (out / "report.md").read_text()
    assert md.startswith("# Miniature with pretrained parts: 4 runs") and "## Stage A" in md
    for png in ("loss_vs_samples.png", "grounding_vs_compute.png"):
        assert (out / png).stat().st_size > 0
    # a third invocation trains nothing
    assert scaling_main(["--pipeline=pretrained", *args]) == 0 and len(calls) == 4
