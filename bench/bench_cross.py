"""Per-kernel benchmark of the encoder-decoder pieces (GPU, bf16): packed cross-attention, the all-layer cross K/V
projection, and the fused image-token projection, each against the unfused PyTorch path and the peers.

    python bench/bench_cross.py [--out DIR] [--parts cross,kv,vision] [--tokens 8192] [--batch 64]

cross   Florenz-3.5B cross-attention (Gemma-2-2B decoder: 8 heads / 4 kv heads, head dim 256, scale 256^-0.5,
        softcap 50), non-causal, forward and forward+backward. Packed rows of --tokens decoder tokens (captions of
        8..96 tokens, seeded) over images of 50 (224 px) or 577 (768 px) tokens plus a 4..12-token prompt; each
        decoder segment sees only its own encoder segment. Useful FLOPs: 4 * H * D * sum_i Lq_i * Lk_i (fwd),
        2.5x that for the backward.
          ours        florenz_kernels.softcap_attention(causal=False, cu_seqlens_q/k)
          flex        torch.compile(flex_attention), softcap score_mod, a document BlockMask, enable_gqa
          padded      florenz_fast.ops `torch` backend on the padded batch with a key mask: what an eager model
                      that pads (the published code) runs
          flash_attn  flash_attn_varlen_func(softcap=50) when the package imports
kv      every decoder layer's cross K and V (26 layers, encoder width 1024 -> 4 x 256) over the encoder states of
        the packed rows: one GEMM over concatenated weights (florenz_fast.modules.project_kv_all_layers) vs 52
        per-layer GEMMs; forward and forward+backward (weights and input).
vision  the image-token projection of florenz-3.5b (C = 2048 -> d = 1024, 2D position + temporal embedding, mean
        token, LayerNorm) at 224 px (49 + 1 tokens) and 768 px (576 + 1), batch --batch: the fused path
        (florenz_kernels.image_tokens) vs the unfused PyTorch sequence (ImageTokenProjector, `torch` backend).

Everything is checked against the reference before it is timed. Times: triton.testing.do_bench medians (ms).
Writes cross_bench.json, cross_bench.md and cross_bench.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from florenz_fast import ops

H, HK, D, SCALE, SOFTCAP = 8, 4, 256, 256 ** -0.5, 50.0
PROFILE = False  # --profile: per-kernel device times (torch.profiler) of the fused paths and their peers


def _bench(fn):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _bench_graph(fn):
    """GPU time alone: fn captured in a CUDA graph and replayed (no Python/launch overhead); None if the path
    cannot be captured."""
    import triton.testing

    try:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    except Exception as e:
        print(f"  (no CUDA-graph timing: {type(e).__name__}: {str(e)[:120]})")
        torch.cuda.synchronize()
        return None


def _fwd_bwd_ms(fn, inputs, grad):
    """Forward and forward+backward ms, wall (do_bench: launches included) and GPU (CUDA graph) medians."""
    def fwd():
        with torch.no_grad():
            fn(*inputs)

    def step():
        torch.autograd.grad(fn(*inputs), inputs, grad)

    return dict(fwd_ms=_bench(fwd), fwd_bwd_ms=_bench(step), fwd_gpu_ms=_bench_graph(fwd),
                fwd_bwd_gpu_ms=_bench_graph(step))


def kernel_breakdown(fn, inputs, grad, steps=3):
    """Device time per kernel (us per forward+backward step) from torch.profiler: where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        torch.autograd.grad(fn(*inputs), inputs, grad)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            torch.autograd.grad(fn(*inputs), inputs, grad)
        torch.cuda.synchronize()
    out = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t and ev.key.find("ProfilerStep") < 0:
            out[ev.key[:70]] = dict(us=round(t / steps, 1), calls=ev.count / steps,
                                    cpu_us=round(ev.cpu_time_total / steps, 1))
    top = dict(sorted(out.items(), key=lambda kv: -kv[1]["us"])[:12])
    print(json.dumps(top, indent=1))
    return top


# ---- cross-attention ------------------------------------------------------------------------------------------


def packed_rows(tokens, image_tokens, seed=0):
    rnd = random.Random(seed)
    lq, lk = [], []
    while sum(lq) < tokens:
        lq.append(min(rnd.randint(8, 96), tokens - sum(lq)))
        lk.append(image_tokens + rnd.randint(4, 12))
    return lq, lk


def cross_inputs(lq, lk, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda n, h: torch.randn(n, h, D, device="cuda", dtype=torch.bfloat16, generator=g)
    return mk(sum(lq), H), mk(sum(lk), HK), mk(sum(lk), HK), mk(sum(lq), H)


def cross_providers(lq, lk):
    cu_q = ops.cu_seqlens_from_lengths(lq, device="cuda")
    cu_k = ops.cu_seqlens_from_lengths(lk, device="cuda")
    mq, mk = max(lq), max(lk)
    provs = {}

    from florenz_kernels.softcap_attention import softcap_attention

    provs["ours"] = lambda q, k, v: softcap_attention(q, k, v, softcap=SOFTCAP, scale=SCALE, causal=False,
                                                      cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=mq,
                                                      max_seqlen_k=mk)[0]

    def flex():
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        for knob in ("cache_size_limit", "recompile_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 64)
        compiled = torch.compile(flex_attention, dynamic=False)
        doc_q = torch.repeat_interleave(torch.arange(len(lq), device="cuda"), torch.tensor(lq, device="cuda"))
        doc_k = torch.repeat_interleave(torch.arange(len(lk), device="cuda"), torch.tensor(lk, device="cuda"))
        mask = create_block_mask(lambda b, h, qi, ki: doc_q[qi] == doc_k[ki], B=None, H=None, Q_LEN=sum(lq),
                                 KV_LEN=sum(lk), device="cuda")

        def score_mod(score, b, h, qi, ki):
            return SOFTCAP * torch.tanh(score / SOFTCAP)

        def fn(q, k, v):
            out = compiled(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                           score_mod=score_mod, block_mask=mask, scale=SCALE, enable_gqa=True)
            return out[0].transpose(0, 1)

        return fn

    def padded():
        B = len(lq)

        def pad_index(lengths, width):  # (B, width) rows of the packed tensor, -1 -> a zero row
            idx = torch.full((B, width), -1, dtype=torch.long)
            start = 0
            for i, n in enumerate(lengths):
                idx[i, :n] = torch.arange(start, start + n)
                start += n
            return idx.cuda()

        iq, ik = pad_index(lq, mq), pad_index(lk, mk)
        kpm = ik >= 0
        real_q = (iq >= 0).flatten().nonzero()[:, 0]  # once, here: no host sync inside the step

        def pad(x, idx):  # one gather: (T, heads, D) -> (B, heads, width, D)
            ext = torch.cat([x, x.new_zeros(1, *x.shape[1:])])
            return ext[idx].transpose(1, 2)

        def fn(q, k, v):  # gathers in and out are part of the step (cheap next to the eager attention)
            out = ops.attention(pad(q, iq), pad(k, ik), pad(v, ik), scale=SCALE, softcap=SOFTCAP,
                                key_padding_mask=kpm, backend="torch")
            return out.transpose(1, 2).flatten(0, 1).index_select(0, real_q)

        return fn

    def flash():
        from flash_attn import flash_attn_varlen_func

        return lambda q, k, v: flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, softmax_scale=SCALE,
                                                      causal=False, softcap=SOFTCAP)

    for name, make in (("flex", flex), ("padded", padded), ("flash_attn", flash)):
        try:
            provs[name] = make()
        except Exception as e:
            provs[name] = f"unavailable: {type(e).__name__}: {e}"[:200]
    return provs, cu_q, cu_k


def check_cross(fn, lq, lk, cu_q, cu_k):
    """Max error of out/dq/dk/dv on the first 6 segments vs float64, next to the bf16 reference's error."""
    q, k, v, do = cross_inputs(lq, lk, seed=1)
    res = {}
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    mine = [fn(*ins)] + list(torch.autograd.grad(fn(*ins), ins, do))
    n_q, n_k = int(cu_q[6]), int(cu_k[6])
    sub = dict(cu_seqlens_q=cu_q[:7], cu_seqlens_k=cu_k[:7], scale=SCALE, softcap=SOFTCAP)
    refs = {}
    for name, dt in (("f64", torch.float64), ("bf16", torch.bfloat16)):
        r_in = [t[:n].to(dt).clone().requires_grad_() for t, n in ((q, n_q), (k, n_k), (v, n_k))]
        out = ops.attention(*r_in, backend="torch", **sub)
        refs[name] = [out] + list(torch.autograd.grad(out, r_in, do[:n_q].to(dt)))
    cut = (n_q, n_q, n_k, n_k)
    for i, nm in enumerate(("out", "dq", "dk", "dv")):
        err = (mine[i][:cut[i]].double() - refs["f64"][i]).abs().max().item()
        low = (refs["bf16"][i].double() - refs["f64"][i]).abs().max().item()
        res[nm] = dict(err=err, err_bf16_ref=low)
    res["ok"] = all(x["err"] <= 2 * x["err_bf16_ref"] + 1e-6 for x in res.values())
    return res


def run_cross(tokens):
    rows = []
    for img in (50, 577):
        lq, lk = packed_rows(tokens, img)
        provs, cu_q, cu_k = cross_providers(lq, lk)
        fl = 4 * H * D * sum(a * b for a, b in zip(lq, lk))
        q, k, v, do = cross_inputs(lq, lk)
        ins = [t.requires_grad_() for t in (q, k, v)]
        for name, fn in provs.items():
            row = dict(part="cross", image_tokens=img, segments=len(lq), q_tokens=sum(lq), k_tokens=sum(lk),
                       provider=name)
            if isinstance(fn, str):
                rows.append(dict(row, error=fn))
                print(f"cross img={img} {name}: {fn}")
                continue
            try:
                if PROFILE and name in ("ours", "flex"):
                    print(f"cross img={img} {name} kernels:")
                    rows.append(dict(part="profile", case=f"cross {img} {name}",
                                     kernels=kernel_breakdown(fn, ins, do)))
                row["check"] = check_cross(fn, lq, lk, cu_q, cu_k)
                t = _fwd_bwd_ms(fn, ins, do)
                row.update(t, fwd_tflops=fl / t["fwd_ms"] / 1e9, fwd_bwd_tflops=3.5 * fl / t["fwd_bwd_ms"] / 1e9)
                if t["fwd_bwd_gpu_ms"]:
                    row.update(fwd_gpu_tflops=fl / t["fwd_gpu_ms"] / 1e9,
                               fwd_bwd_gpu_tflops=3.5 * fl / t["fwd_bwd_gpu_ms"] / 1e9)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
            print(json.dumps(row))
    return rows


# ---- all-layer cross K/V projection -----------------------------------------------------------------------------


def run_kv(tokens, layers=26, width=1024, out=1024):
    """Token counts: one 224 px image, one 768 px image, a generation batch of 8, and the packed training rows."""
    from florenz_fast.modules import project_kv_all_layers

    attns = nn.ModuleList(nn.ModuleDict(dict(k_proj=nn.Linear(width, out, bias=False),
                                             v_proj=nn.Linear(width, out, bias=False))) for _ in range(layers))
    attns = list(attns.cuda().to(torch.bfloat16))
    rows = []
    for S in (60, 587, 8 * 587, sum(packed_rows(tokens, 577)[1])):
        x = torch.randn(1, S, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        params = [x] + [p for a in attns for p in a.parameters()]
        grads = [torch.randn(1, S, out, device="cuda", dtype=torch.bfloat16) for _ in range(2 * layers)]

        def fused(*_):
            return [t for kv in project_kv_all_layers(x, attns) for t in kv]

        def per_layer(*_):
            return [t for a in attns for t in (a.k_proj(x), a.v_proj(x))]

        err = max((a.float() - b.float()).abs().max().item() for a, b in zip(fused(), per_layer()))
        fl = 2 * S * width * layers * 2 * out
        for name, fn in (("one_gemm", fused), ("per_layer", per_layer)):
            t = _fwd_bwd_ms(fn, params, grads)
            rows.append(dict(part="kv", provider=name, tokens=S, layers=layers, **t, max_abs_diff=err,
                             fwd_tflops=fl / t["fwd_ms"] / 1e9, fwd_bwd_tflops=3 * fl / t["fwd_bwd_ms"] / 1e9))
            print(json.dumps(rows[-1]))
    return rows


# ---- image-token projection -----------------------------------------------------------------------------------


def run_vision(batch):
    from florenz_fast.config import get_config
    from florenz_fast.vision import ImageTokenProjector

    cfg = get_config("florenz-3.5b")
    proj = ImageTokenProjector(cfg).cuda().to(torch.bfloat16)
    with torch.no_grad():
        for p in proj.parameters():
            p.normal_(0, 0.02)
    C, d = cfg.vision.dims[-1], cfg.vision.projection_dim
    rows = []
    for side in (7, 24):
        N = side * side
        feats = torch.randn(batch, N, C, device="cuda", dtype=torch.bfloat16).transpose(1, 2).reshape(
            batch, C, side, side).requires_grad_()
        grad = torch.randn(batch, N + 1, d, device="cuda", dtype=torch.bfloat16)
        params = [feats] + [p for p in proj.parameters() if p.requires_grad]
        fns = {}
        for backend in ("triton", "torch"):
            def fn(*_, backend=backend):
                ops.set_backend(backend)
                try:
                    return proj(feats)
                finally:
                    ops.set_backend(None)
            fns[backend] = fn
        with torch.no_grad():
            ref64 = ImageTokenProjector(cfg).cuda().double()
            ref64.load_state_dict({k: v.double() for k, v in proj.state_dict().items()})
            ops.set_backend("torch")
            want = ref64(feats.double())
            ops.set_backend(None)
            errs = {b: (fns[b]().double() - want).abs().max().item() for b in fns}
        moved = batch * N * C * 2 + batch * (N + 1) * d * 2  # bytes a perfect fused forward must move
        if PROFILE:
            for backend in fns:
                print(f"vision side={side} {backend} kernels:")
                rows.append(dict(part="profile", case=f"vision {side}x{side} {backend}",
                                 kernels=kernel_breakdown(fns[backend], params, grad)))
        for backend, label in (("triton", "fused"), ("torch", "unfused")):
            t = _fwd_bwd_ms(fns[backend], params, grad)
            rows.append(dict(part="vision", provider=label, batch=batch, tokens=N + 1, **t,
                             max_err_vs_f64=errs[backend], fwd_gbps=moved / (t["fwd_gpu_ms"] or t["fwd_ms"]) / 1e6))
            print(json.dumps(rows[-1]))
    return rows


# ---- report -----------------------------------------------------------------------------------------------------


def markdown(rows, env):
    lines = [f"# Encoder-decoder kernels, {env['device']} (torch {env['torch']}, triton {env['triton']})", "",
             "wall: triton.testing.do_bench (Python and launch overhead included); GPU: the same step captured in a",
             "CUDA graph and replayed (do_bench_cudagraph). Ratios: the peer's time / ours, forward+backward, GPU.", "",
             "| part | case | provider | fwd ms wall | fwd ms GPU | fwd+bwd ms wall | fwd+bwd ms GPU | "
             "fwd+bwd TFLOP/s GPU | peer / ours fwd | peer / ours fwd+bwd | check |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    key = lambda r: (r["part"], r.get("image_tokens", r.get("tokens")))
    base = {key(r): r for r in rows if r.get("provider") in ("ours", "one_gemm", "fused") and "fwd_ms" in r}
    num = lambda r, k, f="{:.3f}": f.format(r[k]) if r.get(k) is not None else "-"
    for r in rows:
        if r["part"] == "profile":
            continue
        case = (f"{r['q_tokens']} q / {r['k_tokens']} k tokens, images of {r['image_tokens']}" if r["part"] == "cross"
                else f"{r['tokens']} tokens x {r['layers']} layers" if r["part"] == "kv"
                else f"batch {r['batch']} x {r['tokens']} tokens")
        if "error" in r:
            lines.append(f"| {r['part']} | {case} | {r['provider']} | - | - | - | - | - | - | - | {r['error'][:80]} |")
            continue
        b = base.get(key(r))
        def ratio(phase):  # GPU times where both have them, else wall
            t = f"{phase}_gpu_ms" if r.get(f"{phase}_gpu_ms") and b.get(f"{phase}_gpu_ms") else f"{phase}_ms"
            return f"{r[t] / b[t]:.2f}" if b is not r else "-"

        if not b:
            ratio = lambda phase: "-"
        chk = ("ok" if r["check"]["ok"] else "FAILED") if "check" in r else (
            f"err {r.get('max_err_vs_f64', r.get('max_abs_diff')):.2g}")
        lines.append(f"| {r['part']} | {case} | {r['provider']} | {num(r, 'fwd_ms')} | {num(r, 'fwd_gpu_ms')} | "
                     f"{num(r, 'fwd_bwd_ms')} | {num(r, 'fwd_bwd_gpu_ms')} | "
                     f"{num(r, 'fwd_bwd_gpu_tflops', '{:.0f}')} | {ratio('fwd')} | {ratio('fwd_bwd')} | {chk} |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {}
    for r in rows:
        if "fwd_bwd_ms" in r:
            key = f"{r['part']}\n{r.get('image_tokens', r.get('tokens'))}"
            groups.setdefault(key, {})[r["provider"]] = r.get("fwd_bwd_gpu_ms") or r["fwd_bwd_ms"]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    provs = sorted({p for g in groups.values() for p in g})
    width = 0.8 / max(1, len(provs))
    for i, p in enumerate(provs):
        xs = [j + i * width for j, g in enumerate(groups.values()) if p in g]
        ys = [g[p] for g in groups.values() if p in g]
        ax.bar(xs, ys, width, label=p)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], list(groups), fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("forward + backward, GPU ms (CUDA graph; log)")
    ax.set_title("encoder-decoder pieces, bf16 (lower is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results/local"))
    ap.add_argument("--parts", default="cross,kv,vision")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    global PROFILE
    PROFILE = args.profile
    if not torch.cuda.is_available():
        sys.exit("bench_cross.py needs a CUDA GPU (the kernels' CPU path is the Triton interpreter: a test, not a "
                 "benchmark)")
    import triton

    os.makedirs(args.out, exist_ok=True)
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               python=platform.python_version())
    rows = []
    parts = args.parts.split(",")
    if "cross" in parts:
        rows += run_cross(args.tokens)
    if "kv" in parts:
        rows += run_kv(args.tokens)
    if "vision" in parts:
        rows += run_vision(args.batch)
    with open(os.path.join(args.out, "cross_bench.json"), "w") as f:
        json.dump(dict(env=env, args=vars(args), rows=rows), f, indent=1)
    md = markdown(rows, env)
    with open(os.path.join(args.out, "cross_bench.md"), "w") as f:
        f.write(md)
    plot(rows, os.path.join(args.out, "cross_bench.png"))
    print(md)


if __name__ == "__main__":
    main()
