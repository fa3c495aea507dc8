"""The frozen image path once per image (issue 15 item 4): collation dedups images by id, the grouping sampler,
the on-disk feature cache; losses bit-identical (torch.equal) with dedup on/off and cache on/off in every batch
mode, gradients through the gather when the image path trains, no device->host read. CPU, fp32.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass

import pytest
import torch

from florenz_fast.config import get_config
from florenz_fast.features import FeatureCache, image_path_hash
from florenz_fast.florenz import Florenz, apply_trainable_policy, image_features_first
from florenz_fast.packing import InputLimits, collate, image_inputs
from tests.test_static import no_device_host_reads

BOUNDS = dict(max_samples=8, max_encoder_tokens=8 * 17 + 64, max_decoder_tokens=64)  # tiny: 17 image tokens


@dataclass(eq=False)
class Ex:  # the fields of florenz_fast.data.EncodedExample
    pixels: torch.Tensor | None
    prompt_ids: list[int]
    labels: list[int]
    key: str
    image_id: str | None = None
    features: torch.Tensor | None = None


def grouped_examples(cfg, n_images=3, per_image=(3, 1, 2), seed=0) -> list[Ex]:
    """Annotations of `n_images` images in a row (the grouping sampler's order): repeated image ids."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_images):
        pixels = torch.randn(3, cfg.image_size, cfg.image_size, generator=g)
        for _ in range(per_image[i]):
            p, l_ = int(torch.randint(2, 9, (1,), generator=g)), int(torch.randint(3, 12, (1,), generator=g))
            prompt = [0, *torch.randint(3, cfg.encoder.vocab_size, (p - 2,), generator=g).tolist(), 2]
            labels = [2, *torch.randint(3, cfg.decoder.vocab_size, (l_ - 2,), generator=g).tolist(), 1]
            out.append(Ex(pixels, prompt, labels, f"caption-{'en de fr'.split()[len(out) % 3]}", f"img{i}"))
    return out


def strip_ids(examples):
    return [dataclasses.replace(ex, image_id=None) for ex in examples]


def model_for(preset="tiny", policy="spec", drop_path=0.0) -> Florenz:
    cfg = get_config(preset)
    cfg.vision.drop_path = drop_path
    torch.manual_seed(0)
    model = Florenz(cfg).train()  # train mode: encoder dropout draws too, from the seed set before each step
    with torch.no_grad():  # non-zero gates: cross-attention (and so the image) must matter
        for n, p in model.named_parameters():
            if n.endswith("encoder_attn_gate"):
                p.fill_(0.5)
    apply_trainable_policy(model, policy)
    return model


def step(model, batch, features_first=False):
    """Forward + loss + backward with a fixed seed: (loss, token losses, grads)."""
    model.zero_grad(set_to_none=True)
    inputs = batch.model_inputs(host_layout=True)
    if features_first:
        inputs = image_features_first(model, inputs)
    torch.manual_seed(1)
    out = model(**inputs, return_logits=False)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.token_losses.detach(), grads


def cached(examples, model):
    """The examples with their image tokens from a freshly filled cache dict (what the pipeline serves)."""
    distinct = {ex.image_id: ex.pixels for ex in examples}
    tokens = model.frozen_image_tokens(torch.stack(list(distinct.values())))
    by_id = dict(zip(distinct, tokens))
    return [dataclasses.replace(ex, pixels=None, features=by_id[ex.image_id]) for ex in examples]


# ---- collation ---------------------------------------------------------------------------------------------

def test_image_inputs_by_hand():
    px = [torch.full((3, 4, 4), float(i)) for i in range(3)]
    exs = [Ex(px[0], [0, 2], [2, 1], "a", "x"), Ex(px[1], [0, 2], [2, 1], "b", "y"),
           Ex(px[0], [0, 2], [2, 1], "c", "x"), Ex(px[2], [0, 2], [2, 1], "d", None)]
    got = image_inputs(exs)
    assert got["num_images"] == 3 and got["image_index"].tolist() == [0, 1, 0, 2] and got["image_features"] is None
    assert torch.equal(got["pixel_values"], torch.stack([px[0], px[1], px[2]]))
    st = image_inputs(exs, slots=6)  # static: fixed rows, the distinct images first, pad slots -> row 0
    assert st["pixel_values"].shape == (6, 3, 4, 4) and not st["pixel_values"][3:].any()
    assert st["image_index"].tolist() == [0, 1, 0, 2, 0, 0] and st["num_images"] == 3
    feats = torch.randn(5, 8)
    exs[1] = Ex(None, [0, 2], [2, 1], "b", "y", feats)  # y cached: after the pixel images
    got = image_inputs(exs)
    assert got["num_images"] == 2 and got["image_index"].tolist() == [0, 2, 0, 1]
    assert torch.equal(got["image_features"], feats[None])
    plain = image_inputs(strip_ids([exs[0], exs[2]]))  # no ids: the layout of before, no image_index
    assert set(plain) == {"pixel_values"} and plain["pixel_values"].shape[0] == 2
    with pytest.raises(ValueError, match=r"example 0 \(a, image x\) has neither pixels nor cached image tokens"):
        image_inputs([Ex(None, [0, 2], [2, 1], "a", "x")])
    with pytest.raises(ValueError, match="has cached image tokens"):
        image_inputs([exs[1], Ex(None, [0], [2], "e", "z", torch.randn(4, 8))])


@pytest.mark.parametrize("mode", ["padded", "packed", "static"])
def test_dedup_and_cache_give_identical_losses(mode):
    """Same seed: no dedup, dedup, and cached tokens give torch.equal losses, token losses and gradients."""
    model = model_for()
    examples = grouped_examples(model.cfg)
    n_img = model.cfg.num_image_tokens()
    plain = collate(strip_ids(examples), n_img, mode, **BOUNDS)
    dedup = collate(examples, n_img, mode, **BOUNDS)
    cache = collate(cached(examples, model), n_img, mode, **BOUNDS)
    half = collate(cached(examples[:3], model) + examples[3:], n_img, mode, **BOUNDS)  # some cached
    assert plain.image_index is None and dedup.num_images == 3 and cache.num_images == 0
    assert half.num_images == 2 and half.image_features.shape[0] == 1
    if mode != "static":
        assert dedup.pixel_values.shape[0] == 3 and cache.pixel_values is None
    ref_loss, ref_tok, ref_grads = step(model, plain)
    assert ref_grads and "vision_tower.convs.0.conv.weight" not in ref_grads
    for batch, first in ((dedup, False), (cache, False), (half, False), (dedup, True), (cache, True)):
        loss, tok, grads = step(model, batch, features_first=first)
        assert torch.equal(loss, ref_loss) and torch.equal(tok, ref_tok)
        assert grads.keys() == ref_grads.keys() and all(torch.equal(grads[n], ref_grads[n]) for n in grads)


def test_the_equality_can_fail():
    """A dedup that maps a sample to the wrong image moves the losses."""
    model = model_for()
    n_img = model.cfg.num_image_tokens()
    batch = collate(grouped_examples(model.cfg), n_img, "packed")
    wrong = dataclasses.replace(batch, image_index=batch.image_index.roll(1))
    assert (step(model, wrong)[1] - step(model, batch)[1]).abs().max() > 1e-4


def test_each_distinct_image_runs_through_the_tower_once():
    model = model_for()
    model.frozen_image_chunk = 1  # one image per tower call: the calls count the images
    seen = []
    model.vision_tower.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    examples = grouped_examples(model.cfg)  # 6 samples, 3 images
    for mode in ("padded", "packed", "static"):
        seen.clear()
        step(model, collate(examples, model.cfg.num_image_tokens(), mode, **BOUNDS))
        assert seen == [1, 1, 1], (mode, seen)
        seen.clear()
        step(model, collate(strip_ids(examples), model.cfg.num_image_tokens(), mode, **BOUNDS))
        assert len(seen) == (8 if mode == "static" else 6)  # without dedup: every sample (static: every slot)


@pytest.mark.parametrize("mode", ["padded", "static"])
def test_trainable_image_path_gradients_accumulate_through_the_gather(mode):
    """Policy `all`: the tower trains; dedup runs each image once and its gradient sums over the samples that
    share it. Against no dedup: equal losses, and gradients within fp32 reordering (the sum over copies of an
    image is an index_add here and a batch reduction inside the convolutions there)."""
    model = model_for(policy="all")
    examples = grouped_examples(model.cfg)
    n_img = model.cfg.num_image_tokens()
    ref_loss, ref_tok, ref_grads = step(model, collate(strip_ids(examples), n_img, mode, **BOUNDS))
    loss, tok, grads = step(model, collate(examples, n_img, mode, **BOUNDS))
    assert "vision_tower.convs.0.conv.weight" in grads and grads.keys() == ref_grads.keys()
    assert (tok - ref_tok).abs().max() <= 1e-5 and (loss - ref_loss).abs() <= 1e-6
    for n in grads:
        scale = ref_grads[n].abs().max().clamp(min=1e-12)
        assert ((grads[n] - ref_grads[n]).abs().max() / scale) <= 1e-4, n
    assert grads["vision_tower.convs.0.conv.weight"].abs().max() > 1e-6
    with pytest.raises(ValueError, match="need a frozen image path"):
        model(**{**collate(cached(examples, model_for()), n_img, mode, **BOUNDS).model_inputs(host_layout=True)})


def test_drop_path_keeps_one_draw_per_sample():
    """The published recipe: drop_path on in the frozen tower (train mode). Dedup then gathers the pixels first,
    so each sample keeps its own draw: identical to no dedup under the same seed; cached tokens are refused."""
    model = model_for(drop_path=0.3)
    assert model.image_path_stochastic()
    examples = grouped_examples(model.cfg)
    n_img = model.cfg.num_image_tokens()
    for mode in ("padded", "static"):
        ref = step(model, collate(strip_ids(examples), n_img, mode, **BOUNDS))
        got = step(model, collate(examples, n_img, mode, **BOUNDS))
        assert torch.equal(got[1], ref[1])
        torch.manual_seed(5)
        other = model(**collate(examples, n_img, mode, **BOUNDS).model_inputs(host_layout=True)).loss
        assert other != ref[0]  # the seed matters: drop_path does draw
    with pytest.raises(ValueError, match="drop_path active"):
        step(model, collate(cached(examples, model_for()), n_img, "packed"))


@pytest.mark.parametrize("mode", ["padded", "static"])
def test_dedup_step_reads_nothing_back(mode):
    model = model_for()
    examples = grouped_examples(model.cfg)
    limits = InputLimits.from_config(model.cfg)
    for exs in (examples, cached(examples[:3], model) + examples[3:]):
        batch = collate(exs, model.cfg.num_image_tokens(), mode, limits=limits, **BOUNDS)
        inputs = batch.model_inputs(host_layout=True)
        with no_device_host_reads():
            model(**inputs, return_logits=False).loss.backward()


def test_compiled_static_dedup_is_one_graph():
    """image_features_first before the compiled forward: batches with 1, 2 and 3 distinct images and some cached
    give one graph (a recompile raises) and the eager losses."""
    from torch._dynamo.utils import counters

    model = model_for()
    n_img = model.cfg.num_image_tokens()
    examples = grouped_examples(model.cfg)
    limits = InputLimits.from_config(model.cfg)  # ids checked at collation: the graph reads nothing back
    batches = [collate(exs, n_img, "static", limits=limits, **BOUNDS) for exs in
               (examples, examples[:4], examples[3:4], cached(examples[:3], model) + examples[3:],
                cached(examples, model))]
    assert [b.num_images for b in batches] == [3, 2, 1, 2, 0]
    model.eval()
    torch._dynamo.reset()
    counters.clear()
    fn = torch.compile(lambda inputs: model(**inputs).loss, fullgraph=True, dynamic=False, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for b in batches:
            eager = model(**b.model_inputs()).loss
            assert torch.allclose(fn(image_features_first(model, b.model_inputs())), eager, rtol=1e-6, atol=0)
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


# ---- the feature cache -------------------------------------------------------------------------------------

def test_feature_cache_round_trip_and_checks(tmp_path):
    model = model_for()
    cache = FeatureCache.for_model(model, tmp_path, model.cfg.image_size)
    shape = (model.cfg.num_image_tokens(), model.cfg.encoder.d_model)
    a, b = torch.randn(shape), torch.randn(shape)
    assert cache.get("a") is None and "a" not in cache
    cache.put({"a": a, "b": b})
    again = FeatureCache.for_model(model, tmp_path, model.cfg.image_size)  # a fresh reader
    assert torch.equal(again.get("a"), a) and torch.equal(again.get("b"), b) and again.hits == 2
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temporary file
    cache.put({"c": a})  # a second write keeps the earlier entries of its shard
    assert torch.equal(FeatureCache.for_model(model, tmp_path, model.cfg.image_size).get("a"), a)
    with pytest.raises(ValueError, match=r"image 'z' tokens \(3, 3\)"):
        cache.put({"z": torch.zeros(3, 3)})

    other = copy.deepcopy(model)  # other weights: another key, another directory
    with torch.no_grad():
        other.projector.image_proj_norm.bias.add_(1.0)
    assert image_path_hash(other, 64) != image_path_hash(model, 64)
    assert FeatureCache.for_model(other, tmp_path, model.cfg.image_size).get("a") is None

    shard = cache.root / cache.shard_of("a")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(shard))
    for meta, match in (({**cache._metadata(), "key": "0" * 64}, "metadata key"),
                        ({**cache._metadata(), "dtype": "float16"}, "metadata dtype")):
        save_file(tensors, str(shard), metadata=meta)
        with pytest.raises(ValueError, match=f"{shard.name}: {match}"):
            FeatureCache.for_model(model, tmp_path, model.cfg.image_size).get("a")
    save_file({**tensors, "a": torch.zeros(2, 2)}, str(shard), metadata=cache._metadata())
    with pytest.raises(ValueError, match=r"image 'a' has tokens \(2, 2\)"):
        FeatureCache.for_model(model, tmp_path, model.cfg.image_size).get("a")
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match=f"{shard}: not a readable feature shard"):
        FeatureCache.for_model(model, tmp_path, model.cfg.image_size).get("a")
    with pytest.raises(ValueError, match="image_size 32 differs"):
        FeatureCache.for_model(model, tmp_path, 32)


# ---- the pipeline: image ids, the grouping sampler, cached images ------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from florenz_fast.data import build_synthetic_tokenizers, synthetic_records

    records = synthetic_records(12, seed=0, image_size=64)
    enc, dec = build_synthetic_tokenizers(tmp_path_factory.mktemp("tok"), records, vocab_size=512)
    return records, enc, dec


def test_image_ids_are_stable_and_unique(data):
    from florenz_fast.data import DataPipeline, Record, record_image_ids

    records, enc, dec = data
    ids = record_image_ids(records)
    assert len(set(ids)) == len(ids) and ids == record_image_ids(records)
    twins = [Record(records[0].image, records[0].annotations, "same"), Record(records[1].image, records[1].annotations,
                                                                               "same")]
    assert len(set(record_image_ids(twins))) == 2  # same name, other bytes
    pipe = DataPipeline(records, enc, dec, image_size=64, seed=0)
    exs = [next(iter(pipe)) for _ in range(12)]
    assert sorted(ex.image_id for ex in exs) == sorted(ids)  # one epoch: every image once


def test_grouping_sampler(data):
    from florenz_fast.data import DataPipeline

    records, enc, dec = data
    k = 3
    pipe = DataPipeline(records, enc, dec, image_size=64, seed=0, group_size=k)
    exs = [next(iter(pipe)) for _ in range(30)]
    runs = []  # consecutive examples of one image
    for ex in exs:
        if runs and runs[-1][0].image_id == ex.image_id:
            runs[-1].append(ex)
        else:
            runs.append([ex])
    sizes = {r.name: min(k, len(r.annotations)) for r in records}
    by_id = dict(zip(pipe.image_ids, (r.name for r in records)))
    for run in runs[:-1]:
        assert len(run) == sizes[by_id[run[0].image_id]]
        assert len({(ex.key, tuple(ex.labels)) for ex in run}) == len(run)  # distinct annotations
        assert all(ex.pixels is run[0].pixels for ex in run)  # decoded once
    assert max(len(r) for r in runs) > 1
    # off by default, and a state taken mid-group resumes the identical stream
    assert DataPipeline(records, enc, dec, image_size=64, seed=0).fingerprint != pipe.fingerprint
    ref = DataPipeline(records, enc, dec, image_size=64, seed=0, group_size=k)
    it = iter(ref)
    [next(it) for _ in range(4)]
    state = json.loads(json.dumps(ref.state_dict()))
    assert ref._group  # taken inside a group of the same image
    tail = [next(it) for _ in range(8)]
    resumed = DataPipeline(records, enc, dec, image_size=64, seed=0, group_size=k)
    resumed.load_state_dict(state)
    it2 = iter(resumed)
    for a in tail:
        b = next(it2)
        assert (a.image_id, a.key, a.labels, a.prompt_ids) == (b.image_id, b.key, b.labels, b.prompt_ids)
        assert torch.equal(a.pixels, b.pixels)
    with pytest.raises(ValueError, match="group_size must be an int >= 1"):
        DataPipeline(records, enc, dec, image_size=64, seed=0, group_size=0)


def test_pipeline_serves_cached_images_without_pixels(data, tmp_path):
    from florenz_fast.data import DataPipeline

    records, enc, dec = data
    model = model_for()
    pipe = DataPipeline(records, enc, dec, image_size=64, seed=0, group_size=2)
    cache = FeatureCache.for_model(model, tmp_path, 64)
    puts = []
    real_put = cache.put
    cache.put = lambda tokens: puts.append(len(tokens)) or real_put(tokens)
    assert cache.fill(model, pipe, batch=5) == {"cached": 0, "computed": 12, "unreadable": 0}
    assert puts == [12]  # three batches, one write of every shard
    one = next(iter(cache._index(cache.shard_of(pipe.image_ids[0]))))
    assert cache.fill(model, pipe) == {"cached": 12, "computed": 0, "unreadable": 0}
    again = FeatureCache.for_model(model, tmp_path, 64)
    again.put = lambda tokens: puts.append(len(tokens)) or FeatureCache.put(again, tokens)
    for name in list(again.root.iterdir()):
        name.unlink()
    assert again.fill(model, pipe, batch=5, write_bytes=1) == {"cached": 0, "computed": 12, "unreadable": 0}
    assert puts[1:] == [5, 5, 2]  # write_bytes reached after every batch
    assert torch.equal(again.get(one), cache.get(one))
    plain = DataPipeline(records, enc, dec, image_size=64, seed=0, group_size=2)
    pipe.features = cache
    a, b = [next(iter(plain)) for _ in range(4)], [next(iter(pipe)) for _ in range(4)]
    assert all(ex.pixels is None and ex.features is not None for ex in b)
    assert [(x.image_id, x.labels) for x in a] == [(y.image_id, y.labels) for y in b]
    n_img = model.cfg.num_image_tokens()
    for mode in ("padded", "packed", "static"):
        bounds = dict(BOUNDS, max_decoder_tokens=400)
        assert torch.equal(step(model, collate(a, n_img, mode, **bounds))[0],
                           step(model, collate(b, n_img, mode, **bounds))[0])
    with pytest.raises(ValueError, match="drop_path is active"):
        cache.fill(model_for(drop_path=0.1), pipe)
    with pytest.raises(ValueError, match="trains under this policy"):
        cache.fill(model_for(policy="all"), pipe)


def test_training_with_grouping_and_cache_matches(tmp_path):
    """train(): --data.group_annotations and --data.feature_cache (filled before step 1); the cached run's
    losses equal the uncached one's exactly, and a second run reuses the cache."""
    from florenz_fast.train import parse_args, train

    run = ["--steps=3", "--trainable=spec", "--data.synthetic_images=16", "--data.batch_size=6",
           "--data.group_annotations=3", "--save_every=1000", "--log_every=1000", "--model.vision.drop_path=0"]
    for mode in ("packed", "static"):
        ref = train(parse_args([f"--out={tmp_path / mode / 'ref'}", f"--data.mode={mode}", *run]))["losses"]
        got = train(parse_args([f"--out={tmp_path / mode / 'cached'}", f"--data.mode={mode}",
                                f"--data.feature_cache={tmp_path / 'features'}", *run]))["losses"]
        assert got == ref and len(ref) == 3
    assert len(list((tmp_path / "features").glob("*/features-*.safetensors"))) > 1
    with pytest.raises(ValueError, match="drop_path=0"):
        train(parse_args([f"--out={tmp_path / 'bad'}", f"--data.feature_cache={tmp_path / 'features'}",
                          *[a for a in run if "drop_path" not in a]]))
