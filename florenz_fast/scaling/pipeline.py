"""The paper's experiment in miniature with pretrained parts (issue 18): a tiny Florence-2 and tiny Gemma-2 language
models pretrained, joined by prepare, continued (SPEC §7-§8), evaluated for captioning emergence and grounding.

    python -m florenz_fast.scaling --pipeline=pretrained               # the default (designed for <= 90 min, 2 cores)
    python -m florenz_fast.scaling --pipeline=pretrained --out=runs/mini --sizes=gemma-0.24m,gemma-0.67m ...

Stage A: a tiny Florence-2 (DaViT tower, image-token projector, BART encoder-decoder) trained from scratch at 64 px:
the tower and projector first pretrained to tell the scenes' attributes apart (linear heads on the image tokens),
then frozen while the encoder-decoder learns English captioning and detailed captioning of procedurally drawn
scenes (every image drawn once from the seeded generator: a_steps x a_batch_size distinct images, none repeated),
saved in the Microsoft Florence-2 layout
(`convert.import_florence2` reads it); a probe checks its tower tells scene colours apart.
Stage B: per Gemma size of the ladder, a Gemma-2 decoder trained as a language model on en/de/fr/es text of the
scene grammar plus parallel sentences (fresh text every step), saved as a Hugging Face Gemma-2 directory
(config.json + model.safetensors + tokenizer.json; `convert.import_gemma2` reads it).
Stage C: per size, `python -m florenz_fast.prepare` joins A and B exactly as a user joins real checkpoints (zero
gates, copied norms, new cross projections); then SPEC §8 continued pre-training with the SPEC §7 freezing
(`trainable=spec`) on translation between English and de/fr/es in both directions plus captions in en/de only,
for each budget D of seen samples. Each run is evaluated on held-out scenes captioned in all four languages:
SPEC §9 loss groups, per-language caption loss, BLEU/chrF, distinct-caption share, in-language share, and the
grounding accuracy of the colours and shapes named against the scene (scaling.scenes.grounding, with chance).
Then the law L = E + A N^-alpha + B D^-beta per loss group (scaling.fit: bootstrap intervals, held-out largest N),
plots and <out>/report.json / report.md.

Resumable: finished stages (their done.json) and runs (eval.json) are skipped; interrupted training resumes from
train's checkpoints. A progress bar counts the plan's estimated seconds (an estimate from timed pieces on a
2-core CPU, printed up front).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .ladder import ALL_LANGS, IN_LANGS, LADDER, UNSEEN_LANGS, model_config
from .report import build_report, markdown, write_atomic, write_report
from .scenes import grounding, heldout_scenes, lm_texts, scene_annotations, write_scene_manifest


@dataclass
class PipelineConfig:
    out: str = "runs/miniature"
    device: str = "cpu"  # cpu | cuda | auto
    # torch threads on CPU (0: torch's default). 1: on the shared 2-core machine a stage-A step took 0.19 s with
    # one thread and 11 s with two (another job running: the two threads' barriers wait on each other)
    threads: int = 1
    # 2x2 image-token grid (+ the mean token). 128 px (4x4) did not ground stage A, nor did the colour probe of
    # tests/test_scaling.py at 96 or 128 px in 300 steps (docs/scaling.md)
    image_size: int = 64
    seed: int = 0
    # stage A: the Florence-2 (vision widths (w, 2w, 4w, 8w); projector, encoder and BART decoder width d)
    vision_width: int = 16
    florence_width: int = 64
    encoder_layers: int = 2
    bart_layers: int = 2
    a_steps: int = 5000  # x a_batch_size = 80,000 distinct images, each seen once
    a_batch_size: int = 16
    a_lr: float = 2e-3
    # no_vision: during caption training the tower and image-token projector stay frozen (at their attribute
    # pretraining below, or at their random init when a_tower_steps=0), the BART encoder-decoder learns. all
    # (trained with the captions at 1e-3) collapsed the tower: image tokens' spread across images 0.002-0.005 on a
    # norm of 8.3-8.5 (0.97 at init), caption loss the same with another scene's image. A frozen random tower left
    # the decoder blind too (3,000 steps at 64 px), hence the tower pretraining (docs/scaling.md)
    a_trainable: str = "no_vision"
    a_seed: int = 100  # scene seed of stage A's images
    # the tower's drop_path in stage A (the preset's is 0.1); 0 with no_vision: a deterministic frozen image path
    # whose tokens the feature cache computes once per image
    a_drop_path: float = 0.0
    # > 0: before captioning, the tower and projector are pretrained this many steps to tell the scene's
    # attributes (colours, shapes, regions present; background; shape count) from the flattened image tokens
    # through linear heads, on fresh scenes (seed a_seed + 1); then frozen for the caption training
    # 1,000 steps at 1e-4: attribute loss 2.58 -> 1.13, tokens not collapsed (spread 7.1 on a norm of 3.8); at 2e-3
    # the tower collapsed (spread 0.0006, loss 2.80 -> 2.60) as when it trained with the captions
    a_tower_steps: int = 1000
    a_tower_lr: float = 1e-4
    a_max_groups: int = 0  # > 0: stage A sees only scenes of at most this many groups (1: one colour, one shape)
    probe_images: int = 400  # stage A's colour probe: half fit the centroids, half are scored
    # stage B: Gemma-2 language models, one per size (the ladder's decoder widths and depths)
    sizes: str = "gemma-0.24m,gemma-0.67m,gemma-1.4m,gemma-2.0m"
    b_steps: int = 800
    b_batch_size: int = 32
    b_lr: float = 3e-3
    b_parallel: float = 0.5  # share of stage-B documents that are a parallel pair
    # stage C: continued pre-training (SPEC §7-§8) x budgets of seen samples
    budgets: str = "1000,2000,4000,8000,16000,32000"
    batch_size: int = 16
    lr: float = 1e-3
    c_images: int = 8000  # the stage-C image pool (seed c_seed), rendered once, shared by every run
    c_seed: int = 200
    feature_cache: bool = True  # the frozen image path's tokens computed once per image for all runs
    # evaluation
    eval_images: int = 48
    eval_seed: int = 1000
    num_beams: int = 2
    max_new_tokens: int = 40
    eval_batch_size: int = 48
    prefix: bool = False  # also evaluate captions continuing the SPEC §6 prefix ("<lang>+prefix" entries)
    bootstrap: int = 200
    stop_after_runs: int = 0  # end after this many newly trained stage-C runs (tests simulate an interruption)

    def size_list(self) -> list[str]:
        sizes = [s.strip() for s in self.sizes.split(",") if s.strip()]
        for s in sizes:
            if s not in LADDER or LADDER[s][0] != "gemma2":
                raise ValueError(f"--sizes: {s!r} is not a Gemma size of the ladder; known: "
                                 + ", ".join(k for k, v in LADDER.items() if v[0] == "gemma2"))
        if not sizes:
            raise ValueError("--sizes: need at least one Gemma size")
        return sizes

    def budget_list(self) -> list[int]:
        try:
            budgets = sorted({int(b) for b in self.budgets.split(",") if b.strip()})
        except ValueError:
            raise ValueError(f"--budgets must be comma-separated integers, got {self.budgets!r}") from None
        if not budgets or budgets[0] < 1:
            raise ValueError(f"--budgets must hold positive sample counts, got {self.budgets!r}")
        return budgets

    def validate(self) -> "PipelineConfig":
        self.size_list(), self.budget_list()
        for key in ("a_steps", "a_batch_size", "b_steps", "b_batch_size", "batch_size", "c_images"):
            if getattr(self, key) < 1:
                raise ValueError(f"--{key} must be >= 1, got {getattr(self, key)}")
        if self.a_trainable not in ("all", "no_vision"):
            raise ValueError(f"--a_trainable must be all or no_vision, got {self.a_trainable!r}")
        if self.eval_images < 2 or self.probe_images < 10:
            raise ValueError("--eval_images must be >= 2 and --probe_images >= 10")
        if self.image_size % 32:
            raise ValueError(f"--image_size must be a multiple of 32 (the tower's total stride), got {self.image_size}")
        return self


# ---- model configs -----------------------------------------------------------------------------------------------


def florence2_config(cfg: PipelineConfig):
    """Stage A's Florence-2: the tiny-bart preset at the pipeline's widths (BART decoder)."""
    from ..config import get_config

    c = get_config("tiny-bart")
    w, d = cfg.vision_width, cfg.florence_width
    c.name, c.image_size = "miniature-florence2", cfg.image_size
    c.vision.drop_path = cfg.a_drop_path
    c.vision.dims, c.vision.projection_dim = (w, 2 * w, 4 * w, 8 * w), d
    e = c.encoder
    e.d_model, e.layers, e.heads, e.ffn = d, cfg.encoder_layers, 4, 2 * d
    dec = c.decoder
    dec.hidden, dec.layers, dec.heads, dec.kv_heads, dec.head_dim, dec.ffn, dec.encoder_width = (
        d, cfg.bart_layers, 4, 4, d // 4, 2 * d, d)
    return c.validate()


def joined_config(cfg: PipelineConfig, size: str):
    """The Florenz of stage C: stage A's tower and encoder (drop_path 0: frozen, SPEC §7) with the ladder
    entry's Gemma-2 decoder reading the encoder's width."""
    from ..config import get_config

    a = florence2_config(cfg)
    c = get_config("tiny")
    c.name, c.image_size = f"miniature-{size}", cfg.image_size
    c.vision, c.encoder = copy.deepcopy(a.vision), copy.deepcopy(a.encoder)
    c.vision.drop_path = 0.0
    c.decoder = copy.deepcopy(model_config(size).decoder)
    c.decoder.encoder_width = a.encoder.d_model
    return c.validate()


def config_overrides(c, preset: str = "tiny") -> list[str]:
    """`--key=value` overrides that turn `preset` into config `c` (for prepare's command line)."""
    from ..config import get_config

    def leaves(d: dict, prefix: str = ""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    base = dict(leaves(get_config(preset).to_dict()))
    out = []
    for key, value in leaves(c.to_dict()):
        if base.get(key) != value:
            if isinstance(value, (list, tuple)):
                value = ",".join(str(v) for v in value)
            elif isinstance(value, bool):
                value = "true" if value else "false"
            out.append(f"--{key}={value}")
    return out


def decoder_parameters(c) -> int:
    """Parameters of the Gemma-2 that stage B trains (the decoder without cross-attention, gates and norms)."""
    from ..florenz import Florenz

    with torch.device("meta"):
        model = Florenz(c)
    return sum(p.numel() for n, p in model.named_parameters()
               if n.startswith("decoder.") and not _cross_part(n))


def _cross_part(name: str) -> bool:
    return any(p.startswith(("encoder_attn", "post_encoder_attention_layernorm")) for p in name.split("."))


# ---- shared: tokenizers and the held-out set ---------------------------------------------------------------------


def build_tokenizers(cfg: PipelineConfig, out: Path) -> Path:
    """<out>/tokenizers: one encoder + decoder pair for all stages, trained on the grammar's text in all four
    languages (captions, detailed captions, translations both ways), built once."""
    from ..data import Record, build_synthetic_tokenizers
    from ..data.synthetic import sample_scene

    tok = out / "tokenizers"
    if (tok / "decoder" / "tokenizer.json").is_file():
        return tok
    rng = random.Random(f"miniature tokenizers {cfg.seed}")
    records = [Record(image=None, annotations=scene_annotations(sample_scene(rng), ALL_LANGS, ALL_LANGS))
               for _ in range(600)]
    tmp = out / "tokenizers.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    build_synthetic_tokenizers(tmp, records)
    tmp.replace(tok)
    return tok


def _device(cfg: PipelineConfig) -> str:
    from .sweep import _device as device_of

    return device_of(cfg)


def _done(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


# ---- stage A -------------------------------------------------------------------------------------------------------


def stage_a(cfg: PipelineConfig, out: Path, tok: Path, heldout) -> dict:
    """Train the Florence-2 (resumable through train), export it in the Microsoft layout, probe it."""
    from ..checkpoint import save_state_dict
    from ..convert import export_state_dict, load_pretrained
    from ..train import recipe, train

    root = out / "stage_a"
    done = _done(root / "done.json")
    if done is not None:
        print("[miniature] stage A: done before, skipped")
        return done
    t0, c0 = time.perf_counter(), time.process_time()
    n_images = cfg.a_steps * cfg.a_batch_size
    manifest = write_scene_manifest(root / "data", n_images, cfg.a_seed, cfg.image_size, caption_langs=("en",),
                                    max_groups=cfg.a_max_groups)
    t_data = time.perf_counter() - t0
    tc = recipe("tiny")
    tc.preset, tc.model = "miniature-florence2", florence2_config(cfg)
    tc.trainable, tc.steps, tc.out = cfg.a_trainable, cfg.a_steps, str(root / "run")
    tc.device, tc.seed = cfg.device, cfg.seed
    tc.save_every, tc.log_every = max(1, cfg.a_steps // 2), 10 ** 9
    tc.data.source, tc.data.path, tc.data.tokenizers = "manifest", str(manifest), str(tok)
    tc.data.mode, tc.data.batch_size = "padded", cfg.a_batch_size
    tower = pretrain_tower(cfg, root / "tower_init") if cfg.a_tower_steps > 0 else None
    if tower is not None:
        tc.init = str(tower["path"])
    if cfg.feature_cache and cfg.a_trainable == "no_vision" and cfg.a_drop_path == 0:
        tc.data.feature_cache = str(root / "features")
    tc.optim.lr, tc.optim.warmup_steps = cfg.a_lr, max(1, min(50, cfg.a_steps // 10))
    summary = train(tc)
    t_train, c_train = time.perf_counter() - t0 - t_data, time.process_time() - c0
    model = load_pretrained(root / "run" / "final")
    state = export_state_dict(model, "microsoft")
    state.pop("language_model.lm_head.weight", None)  # tied to the decoder embedding, which the layout carries
    ckpt = root / "florence2"
    if ckpt.exists():
        shutil.rmtree(ckpt)
    save_state_dict(state, ckpt, metadata={"writer": "florenz-fast miniature stage A", "layout": "microsoft"},
                    extra_files={"florenz_fast_config.json": json.dumps(model.cfg.to_dict(), indent=2) + "\n"})
    probe = colour_probe(model, cfg)
    captions = stage_a_captions(cfg, root / "run" / "final", tok, heldout)
    captions.update(image_dependence(cfg, root / "run" / "final", tok, heldout))
    result = {"checkpoint": str(ckpt), "layout": "microsoft", "images": n_images, "steps": cfg.a_steps,
              "final_train_loss": summary["losses"][-1] if summary["losses"] else None, "tower_pretraining": tower,
              "data_seconds": t_data, "train_seconds": t_train, "train_cpu_seconds": c_train, "probe": probe,
              "captions_en": captions, "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}
    _write_json(root / "done.json", result)
    print(f"[miniature] stage A: {n_images} images, probe {probe['accuracy']:.2f} (chance {probe['chance']:.2f}, "
          f"random tower {probe['random_init_accuracy']:.2f}; token spread {probe['spread']:.3g} on "
          f"{probe['common']:.3g}, at init {probe['random_init_spread']:.3g}), en caption grounding "
          f"{captions['grounding_accuracy']:.2f} (chance {captions['grounding_chance']:.2f}), "
          f"distinct {captions['distinct_share']:.2f}")
    return result


def _attribute_targets(scene) -> tuple[torch.Tensor, int, int]:
    """(15,) presence of each colour, shape and region; background index; shape count - 1."""
    from ..data.synthetic import BACKGROUNDS, COLOURS, REGIONS, SHAPES

    present = torch.zeros(len(COLOURS) + len(SHAPES) + len(REGIONS))
    for g in scene.groups:
        present[COLOURS.index(g.colour)] = 1
        present[len(COLOURS) + SHAPES.index(g.shape)] = 1
        present[len(COLOURS) + len(SHAPES) + REGIONS.index(g.region)] = 1
    return present, BACKGROUNDS.index(scene.background), scene.n_shapes - 1


def pretrain_tower(cfg: PipelineConfig, path: Path) -> dict:
    """Stage A's tower and projector pretrained (a_tower_steps x a_batch_size fresh scenes, seed a_seed + 1) to
    read the scene's attributes off the flattened image tokens through linear heads (colour / shape / region
    presence: binary cross-entropy; background, shape count: cross-entropy); saved with the rest of the model at
    its init to `path` (train's --init). A frozen tower at its random init left the caption decoder blind here
    (docs/scaling.md). Returns the path and the heads' first / last losses."""
    from ..checkpoint import save_state_dict
    from ..convert import CONFIG_NAME
    from ..data.synthetic import render_scene, synthetic_scene
    from ..florenz import Florenz
    from ..images import preprocess

    path = Path(path)
    if (path / "tower.json").is_file():
        return json.loads((path / "tower.json").read_text())
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = Florenz(florence2_config(cfg))
    parts = list(model.vision_tower.parameters()) + list(model.projector.parameters())
    with torch.no_grad():
        n, d = model.image_tokens(torch.zeros(1, 3, cfg.image_size, cfg.image_size)).shape[1:]
    heads = torch.nn.Linear(n * d, 15 + 2 + 4)
    opt = torch.optim.AdamW(parts + list(heads.parameters()), lr=cfg.a_tower_lr, weight_decay=0.0)
    model.vision_tower.train(), model.projector.train()
    losses, index = [], 0
    for _ in range(cfg.a_tower_steps):
        images, present, background, count = [], [], [], []
        for _ in range(cfg.a_batch_size):
            scene, rng = synthetic_scene(cfg.a_seed + 1, index)
            index += 1
            images.append(render_scene(scene, cfg.image_size, rng))
            p, b, c = _attribute_targets(scene)
            present.append(p), background.append(b), count.append(c)
        out = heads(model.image_tokens(preprocess(images, cfg.image_size)).flatten(1))
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(out[:, :15], torch.stack(present))
                + torch.nn.functional.cross_entropy(out[:, 15:17], torch.tensor(background))
                + torch.nn.functional.cross_entropy(out[:, 17:], torch.tensor(count)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_state_dict(model.state_dict(), tmp, metadata={"writer": "florenz-fast miniature stage A tower"})
    (tmp / CONFIG_NAME).write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n")
    k = max(1, len(losses) // 10)
    result = {"path": str(path), "steps": cfg.a_tower_steps, "images": index,
              "first_loss": sum(losses[:k]) / k, "last_loss": sum(losses[-k:]) / k,
              "seconds": time.perf_counter() - t0}
    (tmp / "tower.json").write_text(json.dumps(result, indent=2) + "\n")
    if path.exists():
        shutil.rmtree(path)
    tmp.replace(path)
    return result


def _image_tokens(model, images, size: int) -> torch.Tensor:
    from ..images import preprocess

    with torch.inference_mode():
        return model.image_tokens(preprocess(images, size)).float()


def colour_probe(model, cfg: PipelineConfig) -> dict:
    """Which colour is the one group of a one-group scene, read off the mean image token by a ridge classifier
    (tokens centred, not rescaled, ridge 1, one-vs-rest least squares): half the probe scenes (seed eval_seed + 7,
    not stage A's) fit it, half are scored; beside chance (the commonest colour's share among the scored) and the
    same probe on the tower at its random init. Not rescaling matters: a tower collapsed to one vector for every
    image (what training it at the run's rate did, issue 10) keeps a tiny spread that per-feature standardising
    would blow up again (a standardised probe scored 0.66 on a tower whose tokens varied 0.01 on a norm of 8.5).
    `spread` / `common`: the tokens' mean distance from their mean over the probe images / the mean's norm."""
    from ..data.synthetic import COLOURS, render_scene, synthetic_scene
    from ..florenz import Florenz

    scenes, index = [], 0
    while len(scenes) < cfg.probe_images:
        scene, rng = synthetic_scene(cfg.eval_seed + 7, index)
        index += 1
        if len(scene.groups) == 1:
            scenes.append((scene, rng))
    images = [render_scene(s, cfg.image_size, rng) for s, rng in scenes]
    labels = torch.tensor([COLOURS.index(s.groups[0].colour) for s, _ in scenes])
    half = cfg.probe_images // 2

    def probe(m) -> tuple[float, float, float]:
        m.eval()
        tokens = torch.cat([_image_tokens(m, images[i:i + 60], cfg.image_size) for i in range(0, len(images), 60)])
        common = tokens.mean(0)
        spread = float((tokens - common).norm(dim=-1).mean())
        feats = tokens.mean(1).double()
        z = torch.cat([feats - feats[:half].mean(0), torch.ones(len(feats), 1, dtype=feats.dtype)], 1)
        y = torch.nn.functional.one_hot(labels, len(COLOURS)).double() * 2 - 1
        a = z[:half]
        w = torch.linalg.solve(a.T @ a + torch.eye(a.shape[1], dtype=a.dtype), a.T @ y[:half])
        acc = float(((z[half:] @ w).argmax(1) == labels[half:]).double().mean())
        return acc, spread, float(common.norm(dim=-1).mean())

    torch.manual_seed(cfg.seed)
    acc, spread, common = probe(model)
    acc0, spread0, common0 = probe(Florenz(model.cfg))
    test = labels[half:]
    return {"accuracy": acc, "random_init_accuracy": acc0, "n_scored": len(test),
            "chance": float(torch.bincount(test, minlength=len(COLOURS)).max()) / len(test),
            "classes": len(COLOURS), "spread": spread, "common": common, "random_init_spread": spread0,
            "random_init_common": common0}


def image_dependence(cfg: PipelineConfig, final: Path, tok: Path, heldout) -> dict:
    """Stage A's English caption loss (teacher forcing) on the held-out scenes with their own images and with
    each caption paired with the next scene's image: equal losses = captions that ignore the image."""
    from .. import eval as ev
    from ..data import Record
    from ..generate import load_pipeline

    records = [Record(image=r.image, annotations=[a for a in r.annotations if a.key == "caption-en"], name=r.name)
               for r in heldout[0]]
    shifted = [Record(image=records[(i + 1) % len(records)].image, annotations=r.annotations, name=r.name)
               for i, r in enumerate(records)]
    pipe = load_pipeline(final, tokenizers=tok, device=_device(cfg))
    pipe.model.eval()
    with torch.inference_mode():
        own = ev.records_losses(pipe, records, cfg.eval_batch_size)["per_key"]["caption-en"]
        other = ev.records_losses(pipe, shifted, cfg.eval_batch_size)["per_key"]["caption-en"]
    return {"caption_loss_own_image": own, "caption_loss_other_image": other}


def stage_a_captions(cfg: PipelineConfig, final: Path, tok: Path, heldout) -> dict:
    """Stage A's own English captions of the held-out scenes: grounding, distinct share, BLEU."""
    from .. import eval as ev
    from ..generate import load_pipeline

    records, scenes = heldout
    pipe = load_pipeline(final, tokenizers=tok, device=_device(cfg))
    pipe.model.eval()
    pipe.config = dataclasses.replace(pipe.config, num_beams=cfg.num_beams,
                                      max_new_tokens=cfg.max_new_tokens).validate()
    items = [ev.Item(image=Path(r.image), refs=[a.target for a in r.annotations
                                                if a.task == "caption" and a.lang == "en"]) for r in records]
    with torch.inference_mode():
        hyps = ev.generate_texts(pipe, items, "caption", "en", cfg.eval_batch_size, "stage A caption-en", False)
    g = grounding(hyps, scenes, "en")
    return {"bleu": ev.bleu(hyps, [it.refs for it in items], "en"), "distinct_share": len(set(hyps)) / len(hyps),
            "grounding_accuracy": g["accuracy"], "grounding_chance": g["chance"],
            "examples": [{"hyp": h, "ref": it.refs[0]} for h, it in zip(hyps[:3], items[:3])]}


# ---- stage B -------------------------------------------------------------------------------------------------------


def hf_gemma2_config(dec) -> dict:
    """A Hugging Face Gemma2Config (config.json) for our decoder config."""
    if dec.query_pre_attn_scalar != int(dec.query_pre_attn_scalar):
        raise ValueError(f"decoder.query_pre_attn_scalar={dec.query_pre_attn_scalar}: Gemma2Config takes an int")
    return {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "vocab_size": dec.vocab_size,
            "hidden_size": dec.hidden, "intermediate_size": dec.ffn, "num_hidden_layers": dec.layers,
            "num_attention_heads": dec.heads, "num_key_value_heads": dec.kv_heads, "head_dim": dec.head_dim,
            "query_pre_attn_scalar": int(dec.query_pre_attn_scalar), "sliding_window": dec.sliding_window,
            "attn_logit_softcapping": dec.attn_softcap, "final_logit_softcapping": dec.final_softcap,
            "rms_norm_eps": dec.rms_eps, "rope_theta": dec.rope_theta, "hidden_activation": "gelu_pytorch_tanh",
            "hidden_act": "gelu_pytorch_tanh", "max_position_embeddings": 8192, "tie_word_embeddings": True,
            "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "torch_dtype": "float32"}


def _lm_batch(texts, dec_tok, max_len: int = 129):
    """(inputs, labels) of `max_len` - 1 tokens (bos + text + eos, truncated, right-padded). One fixed length:
    on the CPU every new sequence length costs a first call several times a warm one (measured 0.1 s vs 1-5 s
    for one fwd+bwd of gemma-0.67m at batch 8)."""
    rows = [[dec_tok.bos_id, *dec_tok.encode(t)][: max_len - 1] + [dec_tok.eos_id] for t in texts]
    L = max_len
    ids = torch.full((len(rows), L), dec_tok.pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    labels = ids[:, 1:].clone()
    labels[labels == dec_tok.pad_id] = -100
    return ids[:, :-1], labels


def lm_loss(model, ids, labels) -> torch.Tensor:
    """Mean next-token cross-entropy of the Gemma decoder alone: the cross-attention reads one zero encoder
    token and its gate is 0 (tanh 0 = 0), so the decoder is exactly a Gemma-2 language model."""
    from ..modules import Layout

    enc = torch.zeros(ids.shape[0], 1, model.cfg.decoder.encoder_width, device=ids.device)
    hidden = model.decoder(ids, Layout(), enc, Layout())
    logits = model.logits(hidden)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def stage_b(cfg: PipelineConfig, out: Path, tok: Path, size: str) -> dict:
    """Pretrain one Gemma-2 language model and save it as a Hugging Face Gemma-2 directory."""
    from ..checkpoint import save_state_dict
    from ..convert import external_name
    from ..florenz import Florenz
    from ..text import load_decoder_tokenizer
    from ..train import OptimConfig, lr_lambda

    root = out / "stage_b" / size
    done = _done(root / "done.json")
    if done is not None:
        print(f"[miniature] stage B {size}: done before, skipped")
        return done
    t0, c0 = time.perf_counter(), time.process_time()
    dec_tok = load_decoder_tokenizer(tok / "decoder")
    c = joined_config(cfg, size)
    device = torch.device(_device(cfg))
    torch.manual_seed(cfg.seed)
    model = Florenz(c).to(device).train()
    params = [p for n, p in model.named_parameters() if n.startswith("decoder.") and not _cross_part(n)]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.b_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(OptimConfig(warmup_steps=max(1, cfg.b_steps // 10)),
                                                             cfg.b_steps))
    rng = random.Random(f"miniature stage B {cfg.seed} {size}")
    losses, step_seconds = [], []
    for _ in range(cfg.b_steps):
        t_step = time.perf_counter()
        ids, labels = _lm_batch(lm_texts(rng, cfg.b_batch_size, parallel=cfg.b_parallel), dec_tok)
        loss = lm_loss(model, ids.to(device), labels.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        step_seconds.append(time.perf_counter() - t_step)
    model.eval()
    val_rng = random.Random(f"miniature stage B held-out {cfg.seed}")
    with torch.inference_mode():
        val = {lang: float(lm_loss(model, *(t.to(device) for t in _lm_batch(
            lm_texts(val_rng, 32, langs=(lang, lang), parallel=0.0), dec_tok)))) for lang in ALL_LANGS}
        val["parallel"] = float(lm_loss(model, *(t.to(device) for t in _lm_batch(
            lm_texts(val_rng, 32, parallel=1.0), dec_tok))))
    state = {external_name(k, "gemma2"): v.detach().cpu() for k, v in model.state_dict().items()
             if k.startswith("decoder.") and not _cross_part(k)}
    hf = root / "gemma2"
    if hf.exists():
        shutil.rmtree(hf)
    save_state_dict(state, hf, metadata={"writer": "florenz-fast miniature stage B"},
                    extra_files={"config.json": json.dumps(hf_gemma2_config(c.decoder), indent=2) + "\n",
                                 "tokenizer.json": (tok / "decoder" / "tokenizer.json").read_text(encoding="utf-8")})
    result = {"checkpoint": str(hf), "size": size, "params": decoder_parameters(c), "steps": cfg.b_steps,
              "documents": cfg.b_steps * cfg.b_batch_size, "first_loss": losses[0], "final_train_loss": losses[-1],
              "heldout_loss": val, "step_seconds_median": sorted(step_seconds)[len(step_seconds) // 2],
              "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}
    _write_json(root / "done.json", result)
    print(f"[miniature] stage B {size}: {result['params']:,} parameters, LM loss {losses[0]:.2f} -> {losses[-1]:.3f}, "
          f"held-out " + ", ".join(f"{k} {v:.3f}" for k, v in val.items()) + f" ({result['seconds']:.0f} s)")
    return result


# ---- stage C -------------------------------------------------------------------------------------------------------


def prepare_init(cfg: PipelineConfig, out: Path, size: str, florence2: str, gemma2: str) -> Path:
    """`python -m florenz_fast.prepare` (a subprocess, as a user runs it) joining A and B into <out>/stage_c/init."""
    init = out / "stage_c" / "init" / size
    if (init / "config.json").is_file():
        return init
    tmp = init.with_name(init.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    cmd = [sys.executable, "-m", "florenz_fast.prepare", "--preset=tiny", f"--florence2={florence2}",
           f"--gemma2={gemma2}", f"--seed={cfg.seed}", f"--out={tmp}", *config_overrides(joined_config(cfg, size))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"prepare failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    (tmp / "prepare.log").write_text(" ".join(cmd) + "\n" + proc.stdout + proc.stderr)
    tmp.replace(init)
    return init


def run_name(size: str, budget: int) -> str:
    return f"{size}-d{budget}"


def stage_c_train_config(cfg: PipelineConfig, size: str, budget: int, run_dir: Path, init: Path, tok: Path,
                         manifest: Path):
    from ..train import recipe

    tc = recipe("tiny")
    tc.preset, tc.model, tc.init, tc.trainable = f"miniature-{size}", joined_config(cfg, size), str(init), "spec"
    tc.steps = max(1, math.ceil(budget / cfg.batch_size))
    tc.out, tc.device, tc.seed = str(run_dir), cfg.device, cfg.seed
    tc.save_every, tc.log_every = max(1, tc.steps // 2), 10 ** 9
    tc.data.source, tc.data.path, tc.data.tokenizers = "manifest", str(manifest), str(tok)
    tc.data.mode, tc.data.batch_size = "padded", cfg.batch_size
    if cfg.feature_cache:
        tc.data.feature_cache = str(run_dir.parent.parent / "features")
    tc.optim.lr, tc.optim.warmup_steps = cfg.lr, max(1, min(20, tc.steps // 10))
    return tc


def train_run(tc) -> dict:
    """Train (or resume) one stage-C run; a separate function so tests can count calls."""
    from ..train import train

    return train(tc)


def language_rows(ev: dict) -> dict:
    """Per language: caption loss, BLEU, chrF, distinct and in-language shares, grounding (no prefix)."""
    per_key = ev["loss_groups"]["per_key"]
    out = {}
    for lang in ALL_LANGS:
        c = ev["captions"][lang]
        out[lang] = {"loss": per_key.get(f"caption-{lang}"), "bleu": c["bleu"], "chrf": c["chrf"],
                     "distinct_share": c["distinct"], "in_language_share": c["in_language"],
                     "grounding_accuracy": c["grounding_accuracy"], "grounding_chance": c["grounding_chance"],
                     "mentions_per_caption": c["mentions_per_caption"]}
    return out


def stage_c_run(cfg: PipelineConfig, out: Path, size: str, budget: int, init: Path, tok: Path, manifest: Path,
                heldout, vocab, n_params: int, total_params: int) -> dict:
    from .sweep import evaluate_run

    records, scenes = heldout
    name = run_name(size, budget)
    run_dir = out / "stage_c" / "runs" / name
    tc = stage_c_train_config(cfg, size, budget, run_dir, init, tok, manifest)
    t0, c0 = time.perf_counter(), time.process_time()
    summary = train_run(tc)
    t_train, c_train = time.perf_counter() - t0, time.process_time() - c0
    final = run_dir / "final"
    if not (final / "config.json").is_file():
        raise RuntimeError(f"{name}: training ended without {final}/config.json")
    samples = sum(json.loads(line)["samples"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                  if line.strip())
    t0, c0 = time.perf_counter(), time.process_time()

    def score(lang, hyps):
        g = grounding(hyps, scenes, lang)
        return {"grounding_accuracy": g["accuracy"], "grounding_chance": g["chance"],
                "mentions_per_caption": g["mentions_per_caption"]}

    ev = evaluate_run(cfg, final, tok, records, vocab, prefixes=(False, True) if cfg.prefix else (False,),
                      score=score)
    row = {"run": name, "size": size, "kind": "gemma2", "params": n_params, "total_params": total_params,
           "budget": budget, "samples": samples, "steps": tc.steps, "resumed_from_step": summary["start_step"],
           "train_seconds": t_train, "eval_seconds": time.perf_counter() - t0, "train_cpu_seconds": c_train,
           "eval_cpu_seconds": time.process_time() - c0,
           "final_train_loss": summary["losses"][-1] if summary["losses"] else None, **ev,
           "languages": language_rows(ev)}
    return row


# ---- the time estimate -------------------------------------------------------------------------------------------
# Seconds on the shared 2-core CPU, one thread, medians of timed steps (docs/scaling.md: 40 steps of each stage-B
# size, a 480-sample stage-C run per size; stage A: whole runs at 64 px, 1,000 and 3,000 caption steps (frozen
# tower, feature cache) and 1,000 tower-pretraining steps): per stage-A caption sample and tower sample at 64 px,
# per stage-B document (128 tokens) fixed + per million decoder parameters, per stage-C sample (frozen tower,
# cached features) likewise, per held-out image of an evaluation (4 languages), a prepare subprocess, rendering and
# caching one image. The stage-C pair was refitted on the default run's (2026-12-02) 4,000-16,000-sample runs: 4.6-5.7
# ms per sample at 35 k decoder parameters, 12.1-13.7 ms at 658 k (64 px; c_sample is per sample at 128 px).

COST = {"a_sample_64": 0.0055, "a_tower_sample_64": 0.0038,
        "b_doc": 0.0035, "b_doc_per_m": 0.022, "c_sample": 0.018, "c_sample_per_m": 0.013,
        "eval_image": 0.1, "eval_image_per_m": 0.3, "prepare": 6.0, "render_image": 0.0008, "cache_image": 0.004}


def estimate(cfg: PipelineConfig) -> dict[str, float]:
    """Estimated seconds per piece of the plan (the stages, each size's LM, each run)."""
    px = (cfg.image_size / 128) ** 2
    px64 = (cfg.image_size / 64) ** 2
    est = {"stage A": cfg.a_steps * cfg.a_batch_size * (COST["a_sample_64"] * px64 + COST["render_image"])
           + cfg.a_tower_steps * cfg.a_batch_size * (COST["a_tower_sample_64"] * px64 + COST["render_image"])}
    est["stage A"] += 2 * cfg.probe_images * COST["cache_image"] * px + cfg.eval_images * COST["eval_image"]
    est["stage C data"] = cfg.c_images * (COST["render_image"] + COST["cache_image"] * px)
    for size in cfg.size_list():
        m = decoder_parameters(joined_config(cfg, size)) / 1e6
        est[f"stage B {size}"] = cfg.b_steps * cfg.b_batch_size * (COST["b_doc"] + COST["b_doc_per_m"] * m)
        est[f"prepare {size}"] = COST["prepare"]
        for budget in cfg.budget_list():
            est[run_name(size, budget)] = (budget * (COST["c_sample"] * px + COST["c_sample_per_m"] * m)
                                           + cfg.eval_images * (1 + cfg.prefix) * (COST["eval_image"]
                                                                                   + COST["eval_image_per_m"] * m))
    return est


# ---- the pipeline -------------------------------------------------------------------------------------------------


def run_pipeline(cfg: PipelineConfig) -> dict:
    """All three stages, the fits and the report (the thread count restored afterwards: sweep.run_threads)."""
    from .sweep import run_threads

    cfg.validate()
    with run_threads(cfg):
        return _run_pipeline(cfg)


def _run_pipeline(cfg: PipelineConfig) -> dict:
    from tqdm import tqdm

    from .sweep import language_words

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "pipeline_config.json", dataclasses.asdict(cfg))
    est = estimate(cfg)
    pending = {k: v for k, v in est.items() if not _piece_done(out, k)}
    print(f"[miniature] plan: {len(est)} pieces, {len(pending)} to do, estimated {sum(pending.values()) / 60:.1f} min "
          f"on a 2-core CPU (of {sum(est.values()) / 60:.1f} min for the whole plan)")
    bar = tqdm(total=round(sum(pending.values())), desc="miniature", unit="est-s")

    def advance(piece: str) -> None:
        if piece in pending:
            bar.update(round(pending.pop(piece)))

    t_start = time.perf_counter()
    tok = build_tokenizers(cfg, out)
    heldout = heldout_scenes(out / "heldout", cfg.eval_images, cfg.eval_seed, cfg.image_size)
    vocab = language_words(heldout[0])
    a = stage_a(cfg, out, tok, heldout)
    advance("stage A")
    b = {}
    for size in cfg.size_list():
        b[size] = stage_b(cfg, out, tok, size)
        advance(f"stage B {size}")
    manifest = write_scene_manifest(out / "stage_c" / "data", cfg.c_images, cfg.c_seed, cfg.image_size,
                                    caption_langs=IN_LANGS, translate_langs=ALL_LANGS)
    advance("stage C data")
    rows, trained = [], 0
    for size in cfg.size_list():
        init = prepare_init(cfg, out, size, a["checkpoint"], b[size]["checkpoint"])
        advance(f"prepare {size}")
        total = _total_params(joined_config(cfg, size))
        for budget in cfg.budget_list():
            name = run_name(size, budget)
            eval_path = out / "stage_c" / "runs" / name / "eval.json"
            if eval_path.is_file():
                row = json.loads(eval_path.read_text())
                rows.append({**row, "languages": language_rows(row)})  # rows of earlier versions: today's fields
                print(f"[miniature] {name}: done before, skipped")
                continue
            if cfg.stop_after_runs and trained >= cfg.stop_after_runs:
                bar.close()
                print(f"[miniature] stopping after {trained} trained run(s) (stop_after_runs)")
                return {"stopped": True, "trained": trained}
            bar.set_postfix_str(name)
            row = stage_c_run(cfg, out, size, budget, init, tok, manifest, heldout, vocab, b[size]["params"], total)
            trained += 1
            _write_json(eval_path, row)
            rows.append(row)
            advance(name)
            lg, la = row["loss_groups"], row["languages"]
            print(f"[miniature] {name}: in-dist {lg['in_distribution']:.3f} unseen {lg['unseen']:.3f} "
                  f"translation {lg['translation']:.3f}; grounding " + " ".join(
                      f"{k} {v['grounding_accuracy']:.2f}" for k, v in la.items())
                  + f" ({row['train_seconds']:.0f} s train, {row['eval_seconds']:.0f} s eval)")
    bar.close()
    report = build_report(cfg, rows, time.perf_counter() - t_start)
    report["form"] = ("L(N, D) = E + A * N^-alpha + B * D^-beta (N = the Gemma-2 decoder's parameters, what stage B "
                      "trained, the same tower and encoder in every run; D = samples seen); least squares on log L, "
                      "L-BFGS from a grid of starts")
    report["stage_a"], report["stage_b"] = a, b
    report["summary"] = summarize(report)
    report["estimate_seconds"] = est
    write_report(report, out)
    report["plots"].append(plot_grounding(report, out))
    _write_json(out / "report.json", report)
    write_atomic(out / "report.md", pipeline_markdown(report))
    print(pipeline_markdown(report))
    return report


def _piece_done(out: Path, piece: str) -> bool:
    if piece == "stage A":
        return (out / "stage_a" / "done.json").is_file()
    if piece.startswith("stage B "):
        return (out / "stage_b" / piece[len("stage B "):] / "done.json").is_file()
    if piece == "stage C data":
        return (out / "stage_c" / "data" / "manifest.jsonl").is_file()
    if piece.startswith("prepare "):
        return (out / "stage_c" / "init" / piece[len("prepare "):] / "config.json").is_file()
    return (out / "stage_c" / "runs" / piece / "eval.json").is_file()


def _total_params(c) -> int:
    from .ladder import count_config_parameters

    return count_config_parameters(c)


# ---- report -------------------------------------------------------------------------------------------------------


def summarize(report: dict) -> dict:
    """The issue's targets, measured: the largest run's grounding in fr/es beside en/de and chance, the en/de
    distinct share, the unseen fit's held-out error."""
    runs = report["runs"]
    if not runs:
        return {}
    big = max(runs, key=lambda r: (r["params"], r["samples"]))
    la = big["languages"]

    def mean(langs, key):
        return sum(la[lang][key] for lang in langs) / len(langs)

    held = report["fits"].get("unseen", {}).get("held_out", {})
    return {"largest_run": big["run"],
            "grounding": {"in_distribution": mean(IN_LANGS, "grounding_accuracy"),
                          "unseen": mean(UNSEEN_LANGS, "grounding_accuracy"),
                          "chance_in_distribution": mean(IN_LANGS, "grounding_chance"),
                          "chance_unseen": mean(UNSEEN_LANGS, "grounding_chance"),
                          "mentions_per_caption_in_distribution": mean(IN_LANGS, "mentions_per_caption"),
                          "mentions_per_caption_unseen": mean(UNSEEN_LANGS, "mentions_per_caption")},
            "in_language_share_unseen": mean(UNSEEN_LANGS, "in_language_share"),
            "distinct_share_en_de": mean(IN_LANGS, "distinct_share"),
            "stage_a_grounded": mean(IN_LANGS, "distinct_share") >= 0.5,
            "unseen_held_out_error": held.get("mean_abs_rel_error"),
            "unseen_held_out_target_met": (held.get("mean_abs_rel_error") is not None
                                           and held["mean_abs_rel_error"] <= 0.25)}


def plot_grounding(report: dict, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    cmap = plt.get_cmap("viridis")
    sizes = sorted({r["params"] for r in report["runs"]})
    for ax, (title, langs) in zip(axes, (("in-distribution (en, de)", IN_LANGS), ("unseen (fr, es)", UNSEEN_LANGS))):
        for i, n in enumerate(sizes):
            pts = sorted((r["params"] * r["samples"], sum(r["languages"][lg]["grounding_accuracy"] for lg in langs)
                          / len(langs), sum(r["languages"][lg]["grounding_chance"] for lg in langs) / len(langs))
                         for r in report["runs"] if r["params"] == n)
            color = cmap(i / max(1, len(sizes) - 1))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=f"N={n / 1e6:.2f}M")
            ax.plot([p[0] for p in pts], [p[2] for p in pts], ":", color=color, alpha=0.6)
        ax.set_xscale("log"), ax.set_xlabel("N x D"), ax.set_title(f"grounding accuracy, {title}; dotted: chance")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("accuracy of colours and shapes named")
    fig.tight_layout()
    tmp = out / "grounding_vs_compute.png.tmp.png"
    fig.savefig(tmp, dpi=110)
    tmp.replace(out / "grounding_vs_compute.png")
    plt.close(fig)
    return "grounding_vs_compute.png"


def pipeline_markdown(report: dict) -> str:
    a, s = report["stage_a"], report.get("summary", {})
    p, ca = a["probe"], a["captions_en"]
    lines = [markdown(report).replace("# Scaling sweep:", "# Miniature with pretrained parts:", 1), "",
             "## Stage A (Florence-2)", "",
             f"- {a['images']} distinct images, {a['steps']} steps, final train loss {a['final_train_loss']:.3f}; "
             f"{a['seconds']:.0f} s",
             f"- colour probe (ridge classifier on the centred mean image token; {p['n_scored']} held-out one-group "
             f"scenes, {p['classes']} colours): {p['accuracy']:.3f}; chance {p['chance']:.3f}; random-init tower "
             f"{p['random_init_accuracy']:.3f}; image tokens' spread across images {p['spread']:.3g} on a norm of "
             f"{p['common']:.3g} (random init: {p['random_init_spread']:.3g} on {p['random_init_common']:.3g})",
             f"- English captions of the held-out scenes: grounding {ca['grounding_accuracy']:.3f} (chance "
             f"{ca['grounding_chance']:.3f}), distinct {ca['distinct_share']:.2f}, BLEU {ca['bleu']:.1f}; caption "
             f"loss with each scene's own image {ca['caption_loss_own_image']:.4f}, with another's "
             f"{ca['caption_loss_other_image']:.4f}", "",
             "## Stage B (Gemma-2 language models)", "",
             "| size | params | documents | LM loss first -> last | held-out en / de / fr / es / parallel | s |",
             "|---|---:|---:|---|---|---:|"]
    for size, b in report["stage_b"].items():
        v = b["heldout_loss"]
        lines.append(f"| {size} | {b['params']:,} | {b['documents']} | {b['first_loss']:.2f} -> "
                     f"{b['final_train_loss']:.3f} | " + " / ".join(f"{v[k]:.3f}" for k in (*ALL_LANGS, "parallel"))
                     + f" | {b['seconds']:.0f} |")
    lines += ["", "## Per language (no prefix)", "",
              "| run | lang | loss | BLEU | chrF | distinct | in-language | grounding | chance | mentions / caption |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["runs"]:
        for lang, v in r["languages"].items():
            lines.append(f"| {r['run']} | {lang} | {v['loss']:.3f} | {v['bleu']:.1f} | {v['chrf']:.1f} | "
                         f"{v['distinct_share']:.2f} | {v['in_language_share']:.2f} | {v['grounding_accuracy']:.3f} "
                         f"| {v['grounding_chance']:.3f} | {v['mentions_per_caption']:.2f} |")
    if s:
        g = s["grounding"]
        held = s["unseen_held_out_error"]
        lines += ["", "## Targets", "",
                  f"- largest run {s['largest_run']}: grounding en/de {g['in_distribution']:.3f} (chance "
                  f"{g['chance_in_distribution']:.3f}), fr/es (never trained as a task) {g['unseen']:.3f} (chance "
                  f"{g['chance_unseen']:.3f}; {g['mentions_per_caption_unseen']:.2f} attribute mentions per caption "
                  f"against {g['mentions_per_caption_in_distribution']:.2f} in en/de, "
                  f"{s['in_language_share_unseen']:.0%} of the fr/es captions in the asked language)",
                  f"- distinct-caption share en/de {s['distinct_share_en_de']:.2f}: "
                  + ("≥ 0.5" if s["stage_a_grounded"] else "< 0.5: target not met (stage A's own English "
                     f"captions: distinct share {ca['distinct_share']:.2f}, grounding {ca['grounding_accuracy']:.3f} "
                     f"vs chance {ca['grounding_chance']:.3f}; below 0.5 there too: stage A has not grounded)"),
                  "- unseen-group fit, held-out largest N: " + (f"mean |rel. error| {held:.1%} ("
                  + ("≤ 25 %: met" if s["unseen_held_out_target_met"] else "> 25 %: not met") + ")"
                  if held is not None else "not computed (too few runs for the held-out fit)")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """`python -m florenz_fast.scaling --pipeline=pretrained --key=value ...` (--help lists the keys)."""
    from .. import cli

    return cli.main(PipelineConfig, run_pipeline, argv, prog="python -m florenz_fast.scaling --pipeline=pretrained",
                    description=__doc__)


__all__ = ["COST", "PipelineConfig", "colour_probe", "config_overrides", "decoder_parameters", "estimate",
           "florence2_config", "hf_gemma2_config", "joined_config", "lm_loss", "main", "prepare_init",
           "run_pipeline", "stage_a", "stage_b", "stage_c_run", "summarize", "train_run"]
