"""Continuous batching (issue 16 item 2): a decode batch of slots kept full, each request at its own position.

"The same" as static batching means, request by request: identical token ids, and scores within 1e-12 in float64
(the two paths pad the encoder and order the same sums differently). The cases are skewed so that slots are
refilled several times: per-request max_new_tokens from 2 to 19, an eos the search really emits (requests finish
early at different steps), decoder prompts of 1, 3 and 4 tokens (read into a slot token by token), encoder
prompts of different lengths, fewer slots than requests; both decoder kinds, greedy and 4 beams, with the SPEC
§9 defaults (n-gram ban 3; forced bos / eos for BART) and the tiny sliding window (8) wrapping around.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from florenz_fast import generate as gen_mod
from florenz_fast.convert import save_pretrained
from florenz_fast.generate import (
    GenerationConfig,
    Job,
    SearchState,
    SlotDecoder,
    continuous_step,
    generate,
    generate_continuous,
    load_pipeline,
    run_batch,
)
from florenz_fast.text import train_decoder_tokenizer, train_encoder_tokenizer
from tests.helpers.builders import tiny_model
from tests.helpers.sync_guard import no_device_host_reads
from tests.test_generate import live_model

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

PROMPTS = [[1], [1, 2, 17, 33], [1, 2, 5]]  # decoder prompts: 1, 4 and 3 tokens
MAX_NEW = [3, 19, 5, 3, 2, 5, 11, 19, 5]  # static groups (prompt, max_new): {0, 3}, {1, 7}, {2, 5, 8}, {4}, {6}
ENC_LEN = [7, 4, 9, 5, 7, 6, 8, 4, 9]


@pytest.fixture(scope="module", params=["tiny", "tiny-bart"])
def model64(request):
    return live_model(request.param).double()


def _jobs(cfg, n=len(MAX_NEW), seed=0):
    g = torch.Generator().manual_seed(seed)
    jobs = []
    for i in range(n):
        pixels = torch.randn(3, cfg.image_size, cfg.image_size, generator=g).double()
        ids = torch.randint(3, cfg.encoder.vocab_size - 1, (ENC_LEN[i],), generator=g)
        ids[0] = 0
        jobs.append(Job(input_ids=ids, pixels=pixels, decoder_prompt=PROMPTS[i % 3], max_new_tokens=MAX_NEW[i]))
    return jobs


def _static(model, jobs, gen):
    """Each job's (tokens, score) from static batches: generate on the jobs that share a decoder prompt and a
    max_new_tokens, their encoder prompts padded to the longest of the group."""
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault((tuple(job.decoder_prompt), job.max_new_tokens), []).append(i)
    out = [None] * len(jobs)
    for (prompt, max_new), idx in groups.items():
        L = max(len(jobs[i].input_ids) for i in idx)
        ids = torch.ones(len(idx), L, dtype=torch.long)
        mask = torch.zeros(len(idx), L, dtype=torch.bool)
        for j, i in enumerate(idx):
            ids[j, :len(jobs[i].input_ids)], mask[j, :len(jobs[i].input_ids)] = jobs[i].input_ids, True
        pixels = torch.stack([jobs[i].pixels for i in idx])
        res = generate(model, pixels, ids, mask, decoder_prompt=prompt,
                       config=GenerationConfig(**{**vars(gen), "max_new_tokens": max_new}))
        for j, i in enumerate(idx):
            out[i] = (res.tokens[j], float(res.scores[j]))
    return out


def _eos(model, jobs, beams):
    """A token the search really emits (job 1, the long one, at step 6, 10 or 14: the first with which the
    requests end at 4 or more different lengths, some on eos before their limit)."""
    gen = GenerationConfig.for_model(model.cfg, num_beams=beams, eos_id=10**6, forced_eos=False)
    emitted = _static(model, jobs[1:2], gen)[0][0]
    for step in (6, 10, 14):
        gen = GenerationConfig.for_model(model.cfg, num_beams=beams, eos_id=emitted[step])
        lengths = [len(t) for t, _ in _static(model, jobs, gen)]
        if len(set(lengths)) >= 4 and any(n < MAX_NEW[i] for i, n in enumerate(lengths)):
            return emitted[step]
    raise AssertionError("no emitted token makes a skewed case")


@pytest.mark.parametrize("beams", [1, 4])
def test_continuous_equals_static_batches(model64, beams):
    jobs = _jobs(model64.cfg)
    assert model64.cfg.decoder.kind == "bart" or model64.cfg.decoder.sliding_window == 8  # 19 + 4 > 2 x 8: wraps
    gen = GenerationConfig.for_model(model64.cfg, num_beams=beams, eos_id=_eos(model64, jobs, beams))
    ref = _static(model64, jobs, gen)
    out = generate_continuous(model64, jobs, slots=3, config=gen)
    for i, (res, (tokens, score)) in enumerate(zip(out.results, ref)):
        assert res.tokens == tokens, i
        assert abs(res.score - score) <= 1e-12, (i, res.score, score)
    lengths = [len(t) for t, _ in ref]
    assert len(set(lengths)) >= 4, lengths  # skewed
    assert any(n < MAX_NEW[i] for i, n in enumerate(lengths)), lengths  # some ended on eos, before their limit
    assert len({tuple(t) for t, _ in ref}) >= 6  # the image and the prompts matter
    # slots really were refilled: 9 jobs in 3 slots, each slot ran several
    assert out.refills == len(jobs) - 3
    per_slot = Counter(r.slot for r in out.results)
    assert len(per_slot) == 3 and max(per_slot.values()) >= 3, per_slot


def test_one_slot_and_more_slots_than_jobs(model64):
    jobs = _jobs(model64.cfg, n=4)
    gen = GenerationConfig.for_model(model64.cfg, num_beams=2)
    ref = _static(model64, jobs, gen)
    for slots in (1, 6):
        out = generate_continuous(model64, jobs, slots=slots, config=gen)
        assert [r.tokens for r in out.results] == [t for t, _ in ref]
        assert max(abs(r.score - s) for r, (_, s) in zip(out.results, ref)) <= 1e-12
        assert out.refills == (3 if slots == 1 else 0)


@torch.no_grad()
def test_per_row_positions_equal_the_shared_position(model64):
    """The per-row decode path with every row at the same position is the shared-position path exactly."""
    cfg = model64.cfg
    g = torch.Generator().manual_seed(5)
    enc = torch.randn(2, 6, cfg.decoder.encoder_width, generator=g).double()
    from florenz_fast.modules import Layout

    cross = model64.decoder.cross_kv(enc)
    caches = {k: model64.decoder.allocate_cache(4, 12, torch.float64, "cpu") for k in ("shared", "rows")}
    for p in range(11):  # past the tiny window (8): the ring wraps
        ids = torch.randint(3, cfg.decoder.vocab_size, (4,), generator=g)
        a = model64.decode_step(ids, torch.tensor(p), caches["shared"], cross, Layout(), 2)
        b = model64.decode_step(ids, torch.full((4,), p), caches["rows"], cross, Layout(), 2)
        assert torch.equal(a, b), p
    for x, y in zip(caches["shared"], caches["rows"]):
        assert torch.equal(x.k, y.k) and torch.equal(x.v, y.v)


@pytest.mark.parametrize("backend", ["torch", "sdpa+torch", "dense+torch"])
def test_cached_attention_per_row_positions(backend):
    """ops.cached_attention with a (N,) position: row n is the op with its own 0-dim position on that row alone
    (the copy-free grouped path for `torch`, the key-masked ops.attention path for the others), a partly written
    cache and a wrapped ring among the rows."""
    from florenz_fast import ops

    g = torch.Generator().manual_seed(0)
    N, H, Hk, C, D = 4, 4, 2, 6, 8
    q, k, v = (torch.randn(*shape, generator=g, dtype=torch.float64)
               for shape in ((N, H, 1, D), (N, Hk, C, D), (N, Hk, C, D)))
    pos = torch.tensor([0, 2, 9, 5])
    rows = ops.cached_attention(q, k, v, pos, scale=0.3, softcap=4.0, backend=backend)
    for n in range(N):
        one = ops.cached_attention(q[n:n + 1], k[n:n + 1], v[n:n + 1], pos[n], scale=0.3, softcap=4.0,
                                   backend=backend)
        assert (rows[n:n + 1] - one).abs().max().item() <= 1e-15, n
    # and not what a shared position would give: the rows' positions matter
    shared = ops.cached_attention(q, k, v, pos[1], scale=0.3, softcap=4.0, backend=backend)
    assert (rows[0] - shared[0]).abs().max().item() > 1e-3


@torch.no_grad()
def test_continuous_step_reads_nothing_back(model64):
    jobs = _jobs(model64.cfg, n=2)
    gen = GenerationConfig.for_model(model64.cfg, num_beams=2)
    enc, layout = model64.encode(torch.stack([j.pixels for j in jobs]), torch.stack([j.input_ids[:4] for j in jobs]))
    st = SearchState.for_slots(2, 2, 12, gen, torch.float64, "cpu")
    dec = SlotDecoder(model64, 2, 2, enc.shape[1], 12, torch.float64, "cpu")
    dec.load([0, 1], list(enc), [None, None])
    for b, job in enumerate(jobs):
        st.refill_(b, job.decoder_prompt, 5, gen.pad_id)
    with no_device_host_reads():
        for _ in range(6):
            continuous_step(model64, dec.caches, dec.cross, dec.enc_layout, st, gen)
    # slot 0 (prompt of 1 token, limit 1 + 5): 5 search steps, then over and held at cur 6; slot 1 (4 tokens):
    # 3 steps reading its prompt, then 3 search steps
    assert st.cur.tolist() == [6, 7] and st.stopped.tolist() == [True, False] and st.steps.tolist() == [5, 3]


def test_compiled_continuous_step_equals_eager():
    model = tiny_model("tiny", seed=2)
    jobs = [Job(input_ids=j.input_ids, pixels=j.pixels.float(), decoder_prompt=j.decoder_prompt,
                max_new_tokens=j.max_new_tokens) for j in _jobs(model.cfg, n=5)]
    gen = GenerationConfig.for_model(model.cfg, num_beams=2)
    eager = generate_continuous(model, jobs, slots=2, config=gen)
    torch._dynamo.reset()
    comp = generate_continuous(model, jobs, slots=2, config=gen, compile="aot_eager")
    assert [r.tokens for r in comp.results] == [r.tokens for r in eager.results]
    assert [r.score for r in comp.results] == [r.score for r in eager.results]  # bit for bit
    assert comp.refills == eager.refills == 3


def test_a_failing_job_is_its_result_and_errors_name_the_job(model64):
    jobs = _jobs(model64.cfg, n=4)

    def broken():
        raise ValueError("x.png: cannot read image")

    jobs[1] = Job(input_ids=jobs[1].input_ids, pixels=broken)
    gen = GenerationConfig.for_model(model64.cfg, num_beams=1)
    seen = []
    out = generate_continuous(model64, jobs, slots=2, config=gen, on_result=lambda i, r: seen.append(i))
    assert isinstance(out.results[1], ValueError) and sorted(seen) == [0, 1, 2, 3]
    ref = _static(model64, [jobs[i] for i in (0, 2, 3)], gen)
    assert [out.results[i].tokens for i in (0, 2, 3)] == [t for t, _ in ref]
    with pytest.raises(ValueError, match="slots must be >= 1, got 0"):
        generate_continuous(model64, jobs, slots=0, config=gen)
    with pytest.raises(ValueError, match="job 2: decoder prompt is empty"):
        generate_continuous(model64, [jobs[0], jobs[0], Job(jobs[0].input_ids, jobs[0].pixels, [])], slots=2,
                            config=gen)
    with pytest.raises(ValueError, match="job 0: max_new_tokens must be >= 1, got 0"):
        generate_continuous(model64, [Job(jobs[0].input_ids, jobs[0].pixels, None, 0)], slots=2, config=gen)
    with pytest.raises(ValueError, match="no jobs"):
        generate_continuous(model64, [], slots=2, config=gen)


# ---- batch mode: --continuous ---------------------------------------------------------------------------------

TEXTS = ["a red circle on the left", "ein roter Kreis links", "The image shows", "Das Bild zeigt",
         "The target language is German. What does the image describe?", "Translate the following text: a dog"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("continuous")
    save_pretrained(tiny_model("tiny", seed=3), root / "model")
    train_encoder_tokenizer(root / "model" / "tokenizers" / "encoder", TEXTS, 300)
    train_decoder_tokenizer(root / "model" / "tokenizers" / "decoder", TEXTS, 300)
    for i, color in enumerate(["red", "green", "blue", "white", "black", "yellow", "purple"]):
        Image.new("RGB", (24 + 8 * i, 20 + 3 * i), color).save(root / f"{i}.png")
    (root / "bad.png").write_text("not an image")
    rows = [{"image": "bad.png" if i == 3 else f"{i}.png", "id": f"r{i}", "lang": ("en", "de")[i % 2],
             **({"task": "translate", "src": "a dog and a red circle"} if i == 5 else {})} for i in range(7)]
    (root / "batch.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_batch_mode_continuous_equals_static(ckpt, tmp_path):
    """run_batch with continuous=True in float64: the error row, and every other row's text and tokens as the
    static chunks make them (scores within 1e-12), prefixes of different lengths included."""
    pipe = load_pipeline(ckpt / "model", device="cpu", dtype=torch.float64)
    pipe.config = GenerationConfig.for_model(pipe.model.cfg, num_beams=2, max_new_tokens=6)
    requests = gen_mod.read_requests(ckpt / "batch.jsonl", check_images=False)
    files = {}
    for continuous in (False, True):
        files[continuous] = tmp_path / f"{continuous}.jsonl"
        status = run_batch(pipe, requests, out=files[continuous], batch_size=2, prefix=True, log=lambda m: None,
                           continuous=continuous)
        assert status == gen_mod.PARTIAL_EXIT
    static, cont = ([json.loads(line) for line in files[c].read_text().splitlines()] for c in (False, True))
    assert [r["id"] for r in cont] == [f"r{i}" for i in range(7)]
    assert "bad.png" in cont[3]["error"] and "error" in static[3]
    for a, b in zip(static, cont):
        assert {k: v for k, v in a.items() if k != "score"} == {k: v for k, v in b.items() if k != "score"}
        assert ("score" in a) == ("score" in b) and abs(a.get("score", 0) - b.get("score", 0)) <= 1e-12


def test_cli_continuous_is_killed_keeps_its_rows_and_resumes(ckpt, tmp_path, capsys, monkeypatch):
    args = [f"--ckpt={ckpt / 'model'}", f"--batch={ckpt / 'batch.jsonl'}", "--batch_size=2", "--max_new_tokens=4",
            "--num_beams=2", "--continuous=true"]
    clean = tmp_path / "clean.jsonl"
    assert gen_mod.main(args + [f"--out={clean}"]) == 3
    assert "6 done, 1 error, 0 skipped" in capsys.readouterr().err
    original = gen_mod.Pipeline.generate_continuous

    def killed_after_three_rows(self, requests, *, slots, prefix=False, on_row=None):
        made = []

        def on(i, row):
            made.append(i)
            on_row(i, row)
            if len(made) == 3:
                raise KeyboardInterrupt

        return original(self, requests, slots=slots, prefix=prefix, on_row=on)

    out = tmp_path / "resumed.jsonl"
    monkeypatch.setattr(gen_mod.Pipeline, "generate_continuous", killed_after_three_rows)
    assert gen_mod.main(args + [f"--out={out}"]) == 130
    assert "stopped after 3 of 7 requests" in capsys.readouterr().err
    kept = [json.loads(line) for line in gen_mod.partial_path(out).read_text().splitlines()]
    assert len(kept) == 3  # every row made before the interrupt was kept
    monkeypatch.setattr(gen_mod.Pipeline, "generate_continuous", original)
    assert gen_mod.main(args + [f"--out={out}"]) == 3
    err = capsys.readouterr().err
    done_before = sum("text" in r for r in kept)
    assert f"{done_before} of 7 requests already done, skipped" in err
    rows, ref = ([json.loads(line) for line in p.read_text().splitlines()] for p in (out, clean))
    assert [r["id"] for r in rows] == [r["id"] for r in ref]
    # float32 here: the resumed run's slots hold other neighbours, so the same text and tokens, and the score
    # within a float32 rounding of the clean run's
    for a, b in zip(rows, ref):
        assert a.get("text") == b.get("text") and a.get("tokens") == b.get("tokens") and ("error" in a) == (
            "error" in b)
        assert abs(a.get("score", 0) - b.get("score", 0)) <= 1e-5 * max(1.0, abs(b.get("score", 0)))



def test_eval_generate_texts_continuous(ckpt):
    from florenz_fast import eval as ev

    pipe = load_pipeline(ckpt / "model", device="cpu", dtype=torch.float64)
    pipe.config = GenerationConfig.for_model(pipe.model.cfg, num_beams=2, max_new_tokens=5)
    items = [ev.Item(image=ckpt / f"{i}.png", refs=["x"]) for i in range(5)]
    static = ev.generate_texts(pipe, items, "caption", "de", 2, "t", True)
    assert ev.generate_texts(pipe, items, "caption", "de", 2, "t", True, continuous=True) == static
    with pytest.raises(ValueError, match="bad.png"):
        ev.generate_texts(pipe, items + [ev.Item(image=ckpt / "bad.png", refs=["x"])], "caption", "de", 2, "t",
                          False, continuous=True)
