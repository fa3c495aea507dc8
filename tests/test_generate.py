"""Generation: the cached search against the full-recompute path and against transformers' beam search.

"The same" here means: identical token ids, and beam / greedy scores equal within 1e-12 in float64 (cached vs
recompute: the two paths sum the same terms in a different order) or within 2e-5 in float32 (ours vs
transformers, whose eager attention rounds differently); the tokens must match exactly in every case.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from florenz_fast.config import get_config
from florenz_fast.convert import import_florence2
from florenz_fast.florenz import Florenz
from florenz_fast.generate import GenerationConfig, generate, process_log_probs, score
from florenz_fast.modules import KVCache
from florenz_fast.ops import softcap
from tests.helpers import hf_models
from tests.helpers.hf_models import IMAGE_TOKEN_ID, florence2_reference, randomize_

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _inputs(cfg, B=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g).to(dtype)
    ids = torch.randint(3, cfg.encoder.vocab_size - 1, (B, 7), generator=g)
    ids[:, 0] = 0
    mask = torch.ones_like(ids, dtype=torch.bool)
    if B > 1:  # a padded prompt: the encoder key mask reaches the cross-attention
        mask[1, 5:] = False
        ids[1, 5:] = 1
    return pixels, ids, mask


def _pick_eos(model, pixels, ids, mask, step: int, beams: int, max_new: int, prompt=None) -> int:
    """A token the search really emits (image 0, at `step`, same beams): used as eos so that hypotheses finish
    at different lengths instead of all running to max_new_tokens (random weights rarely pick id 1)."""
    cfg = GenerationConfig.for_model(model.cfg, num_beams=beams, max_new_tokens=max_new, eos_id=10**6,
                                     forced_eos=False)
    return generate(model, pixels, ids, mask, config=cfg, decoder_prompt=prompt).tokens[0][step]


def live_model(name: str, seed: int = 3) -> Florenz:
    """Random weights where every term matters: all parameters ~ N(0, 0.1), LayerNorm weights around 1 (else
    the encoder output, and with it the image, would vanish), cross-attention gates 1."""
    model = Florenz(get_config(name)).eval()
    randomize_(model, seed=seed, std=0.1)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.add_(1.0)
        for layer in model.decoder.layers:
            if hasattr(layer, "encoder_attn_gate"):
                layer.encoder_attn_gate.fill_(1.0)
    return model


@pytest.fixture(scope="module", params=["tiny", "tiny-bart"])
def model64(request):
    return live_model(request.param).double()


@pytest.mark.parametrize("beams", [1, 4])
def test_cached_equals_full_recompute(model64, beams):
    cfg = model64.cfg
    window = cfg.decoder.sliding_window
    pixels, ids, mask = _inputs(cfg)
    max_new = 3 * 8 + 5  # > 3x the tiny window (8): the ring buffer wraps around several times
    eos = _pick_eos(model64, pixels, ids, mask, step=12, beams=beams, max_new=max_new)
    gen = GenerationConfig.for_model(cfg, num_beams=beams, max_new_tokens=max_new, eos_id=eos)
    cached = generate(model64, pixels, ids, mask, config=gen)
    full = generate(model64, pixels, ids, mask, config=gen, cache=False)
    assert cached.tokens == full.tokens
    assert len({tuple(t) for t in cached.tokens}) == 3  # the image and prompt matter
    assert (cached.scores - full.scores).abs().max().item() <= 1e-12
    lengths = [len(t) for t in cached.tokens]
    assert min(lengths) < max_new  # some hypothesis finished on eos ...
    assert max(lengths) > 8  # ... and some decoded past the window
    if cfg.decoder.kind == "gemma2":
        assert window == 8 and cached.steps > window


def test_cached_equals_full_recompute_with_prompt_and_fp32():
    """A decoder prompt (the caption-prefix path: several positions prefilled through the cache) in float32:
    tokens identical, scores within float32 rounding."""
    model = live_model("tiny", seed=5)
    pixels, ids, mask = _inputs(model.cfg, dtype=torch.float32)
    prompt = [1, 2, 17, 99, 5]
    gen = GenerationConfig.for_model(model.cfg, num_beams=3, max_new_tokens=14)
    cached = generate(model, pixels, ids, mask, config=gen, decoder_prompt=prompt)
    full = generate(model, pixels, ids, mask, config=gen, decoder_prompt=prompt, cache=False)
    assert cached.tokens == full.tokens
    assert (cached.scores - full.scores).abs().max().item() <= 1e-5


def test_window_layers_keep_only_their_window():
    model = Florenz(get_config("tiny")).eval()
    caches = model.decoder.allocate_cache(6, 40, torch.float32, "cpu")
    assert [c.slots for c in caches] == [8, 40, 8]  # even layers slide (window 8), odd ones hold 40
    assert caches[0].k.shape == (6, model.cfg.decoder.kv_heads, 8, model.cfg.decoder.head_dim)


def test_beam_reorder_is_in_place_gather():
    c = KVCache.allocate(4, 2, 3, 5, torch.float32, "cpu")
    c.k.copy_(torch.arange(4.0)[:, None, None, None].expand_as(c.k))
    ptr = c.k.data_ptr()
    c.reorder_(torch.tensor([2, 2, 0, 3]))
    assert c.k.data_ptr() == ptr
    assert c.k[:, 0, 0, 0].tolist() == [2.0, 2.0, 0.0, 3.0]


def test_no_repeat_ngram_matches_definition():
    """A brute-force reading of no_repeat_ngram_size: token t is banned iff (last n-1 tokens, t) occurred."""
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(0, 4, (6, 11), generator=g)
    for n in (1, 2, 3, 4):
        cfg = GenerationConfig(no_repeat_ngram_size=n)
        logp = process_log_probs(torch.zeros(6, 5), seqs, 0, 100, cfg)
        for r in range(6):
            s = seqs[r].tolist()
            grams = {tuple(s[i:i + n]) for i in range(len(s) - n + 1)}
            want = {t for t in range(5) if tuple(s[len(s) - n + 1:] + [t]) in grams}
            assert {t for t in range(5) if logp[r, t] == float("-inf")} == want


# ---- against transformers -------------------------------------------------------------------------------


def _hf_generate(model, gen: GenerationConfig, **inputs):
    out = model.generate(**inputs, num_beams=gen.num_beams, max_new_tokens=gen.max_new_tokens,
                         no_repeat_ngram_size=gen.no_repeat_ngram_size, early_stopping=gen.early_stopping,
                         length_penalty=gen.length_penalty, do_sample=False, eos_token_id=gen.eos_id,
                         pad_token_id=gen.pad_id, output_scores=True, return_dict_in_generate=True)
    return out.sequences, out.sequences_scores


def _assert_same_as_hf(ours, hf_seqs, hf_scores, prompt_len):
    for b, toks in enumerate(ours.tokens):
        row = hf_seqs[b, prompt_len:].tolist()
        assert toks == row[:len(toks)], (b, toks, row)
        assert all(t == 0 for t in row[len(toks):])  # the rest is transformers' padding
    assert (ours.scores - hf_scores).abs().max().item() <= 2e-5


@pytest.fixture(scope="module")
def gemma_pair(tmp_path_factory):
    return hf_models.gemma_pair(tmp_path_factory.mktemp("gemma2"))


@pytest.mark.parametrize("prompt, eos_step, length_penalty", [
    ([1, 2, 40, 41], 9, 1.0), ([1, 2, 300], 1, 1.0), ([1], 4, 0.0), ([1, 2, 40, 41], 6, 0.0)])
def test_beam_search_matches_transformers_gemma2(gemma_pair, prompt, eos_step, length_penalty):
    """length_penalty 0 (sum of log-probs) lets short finished hypotheses win: both outcomes are covered."""
    ref, ours = gemma_pair
    pixels, ids, mask = _inputs(ours.cfg, B=1, dtype=torch.float32)
    eos = _pick_eos(ours, pixels, ids, mask, step=eos_step, beams=4, max_new=20, prompt=prompt)
    gen = GenerationConfig.for_model(ours.cfg, num_beams=4, max_new_tokens=20, eos_id=eos,
                                     length_penalty=length_penalty)
    mine = generate(ours, pixels, ids, mask, config=gen, decoder_prompt=prompt)
    with torch.no_grad():
        seqs, scores = _hf_generate(ref, gen, input_ids=torch.tensor([prompt]))
    if length_penalty == 0.0:
        assert mine.tokens[0][-1] == eos and len(mine.tokens[0]) < 20  # a finished hypothesis won
    _assert_same_as_hf(mine, seqs, scores, len(prompt))


class _Softcap(nn.Module):
    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, x):
        return softcap(self.head(x), 30.0)


def test_beam_search_matches_transformers_florence2_bart(tmp_path):
    cfg = get_config("tiny-bart")
    ref = florence2_reference(cfg, seed=2)
    with torch.no_grad():
        ref.model.language_model.shared.weight.mul_(10.0)
    ref.save_pretrained(tmp_path)
    ours = Florenz(cfg).eval()
    import_florence2(ours, tmp_path)
    ref.lm_head = _Softcap(ref.lm_head)  # Florenz's BART presets softcap the logits at 30 (SPEC §5)
    pixels, ids, mask = _inputs(cfg, B=2, dtype=torch.float32)
    ids = ids.clamp(max=IMAGE_TOKEN_ID - 1)
    n_img = cfg.num_image_tokens()
    eos = _pick_eos(ours, pixels, ids, mask, step=7, beams=4, max_new=16)
    gen = GenerationConfig.for_model(cfg, num_beams=4, max_new_tokens=16, eos_id=eos)
    assert gen.forced_bos and gen.forced_eos
    mine = generate(ours, pixels, ids, mask, config=gen)
    hf_ids = torch.cat([torch.full((2, n_img), IMAGE_TOKEN_ID), ids], dim=1)
    hf_mask = torch.cat([torch.ones(2, n_img, dtype=torch.long), mask.long()], dim=1)
    with torch.no_grad():
        seqs, scores = _hf_generate(ref, gen, input_ids=hf_ids, pixel_values=pixels, attention_mask=hf_mask,
                                    decoder_start_token_id=1, forced_bos_token_id=2, forced_eos_token_id=eos)
    assert all(t[0] == 2 for t in mine.tokens)  # forced bos
    _assert_same_as_hf(mine, seqs, scores, 1)


# ---- scoring --------------------------------------------------------------------------------------------


def test_score_equals_per_token_log_probs(model64):
    pixels, ids, mask = _inputs(model64.cfg)
    labels = torch.tensor([[2, 40, 41, 1, -100], [2, 7, 1, -100, -100], [2, 9, 9, 9, 1]])
    res = score(model64, pixels, ids, mask, labels)
    for b in range(3):  # one row at a time, unpadded, by the definition
        lab = labels[b][labels[b] != -100]
        dec_in = torch.cat([torch.tensor([1]), lab[:-1]])[None]
        logits = model64(pixels[b:b + 1], ids[b:b + 1], dec_in, attention_mask=mask[b:b + 1]).logits
        want = torch.log_softmax(logits, -1)[0].gather(1, lab[:, None]).sum()
        assert abs(res.logprob[b].item() - want.item()) <= 1e-10
        assert res.tokens[b].item() == len(lab)
    assert torch.allclose(res.perplexity, torch.exp(-res.logprob / res.tokens))


def test_generate_errors(model64):
    pixels, ids, mask = _inputs(model64.cfg)
    with pytest.raises(ValueError, match="empty batch"):
        generate(model64, pixels[:0], ids[:0], mask[:0])
    with pytest.raises(ValueError, match="num_beams"):
        generate(model64, pixels, ids, mask, config=GenerationConfig(num_beams=0))
    model64.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            generate(model64, pixels, ids, mask)
    finally:
        model64.eval()


def test_bf16_weights_generate_cached_like_uncached():
    # bf16 parameters with fp32 buffers (RoPE's inv_freq, the temporal table), as bench/generate.py loads them on
    # a GPU: the image tokens must not promote to fp32 before the bf16 projection (a dtype error there, once)
    torch.manual_seed(0)
    cfg = get_config("tiny")
    model = Florenz(cfg).eval()
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    px = torch.randn(2, 3, cfg.image_size, cfg.image_size).to(torch.bfloat16)
    ids = torch.randint(3, 100, (2, 6))
    gen = GenerationConfig.for_model(cfg, num_beams=2, max_new_tokens=5, min_new_tokens=5)
    cached = generate(model, px, ids, config=gen)
    full = generate(model, px, ids, config=gen, cache=False)
    assert cached.tokens == full.tokens and len(cached.tokens) == 2
