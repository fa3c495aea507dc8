"""Decode-time kernels of csrc/ on a GPU: florenz::decode_attention (flash-decoding over the KV cache),
florenz::cross_decode_attention (beams sharing an image's cached encoder K/V) and florenz::rope_kv_append (RoPE +
cache append), against the PyTorch reference and flash_attn_with_kvcache when importable.

    python bench/bench_decode.py [--out bench/results/<device>] [--peak-gbs 3350]

Gemma-2-2B shapes: 8 query heads / 4 KV heads, head dim 256, softcap 50, bf16. Achieved bandwidth counts the bytes
that must move: the K/V cache read (each sequence's filled slots) plus q and out; for cross-attention each image's
K/V once (the beams' re-reads should hit L2). Every method is checked against the float64 reference first.
Times are triton.testing.do_bench medians (ms -> us). Writes decode.json and decode.md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from florenz_fast import ops

H, HK, D, SOFTCAP = 8, 4, 256, 50.0
SCALE = 256 ** -0.5


def bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3  # us


def check(got, ref64, ref_lowp) -> dict:
    e = (got.double() - ref64).abs().max().item()
    e_ref = (ref_lowp.double() - ref64).abs().max().item()
    return {"max_err": e, "ref_bf16_err": e_ref, "ok": e <= 2 * e_ref + 1e-6}


def decode_point(B, C, peak, flash):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, HK, C, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, HK, C, D, device="cuda", dtype=torch.bfloat16, generator=g)
    lens = torch.full((B,), C, dtype=torch.int32, device="cuda")
    nbytes = 2 * B * HK * C * D * 2 + 2 * B * H * D * 2
    row = {"batch": B, "cache": C, "bytes": nbytes}
    ours = lambda: ops.decode_attention(q, k, v, lens, scale=SCALE, softcap=SOFTCAP, backend="ext")
    ref = lambda: ops.decode_attention_reference(q, k, v, lens, SCALE, SOFTCAP, 0)
    nb = min(B, 8)  # validate on a slice (the fp64 reference of the whole batch is large)
    ref64 = ops.decode_attention_reference(q[:nb].double(), k[:nb].double(), v[:nb].double(), lens[:nb], SCALE,
                                           SOFTCAP, 0)
    row["check"] = check(ours()[:nb], ref64, ref()[:nb])
    for name, fn in (("cuda", ours), ("torch", ref)):
        t = bench(fn)
        row[name] = {"us": t, "GBps": nbytes / t * 1e-3, "pct_peak": 100 * nbytes / t * 1e-3 / peak}
    if flash is not None:
        # flash-attn's cache layout is (B, C, Hk, D)
        kf, vf, qf = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(), q.transpose(1, 2).contiguous()
        fa = lambda: flash(qf, kf, vf, cache_seqlens=lens, softmax_scale=SCALE, causal=True,
                           softcap=SOFTCAP)
        t = bench(fa)
        row["flash_attn"] = {"us": t, "GBps": nbytes / t * 1e-3, "pct_peak": 100 * nbytes / t * 1e-3 / peak}
    return row


def cross_point(n_images, beams, S, layers, peak):
    g = torch.Generator(device="cuda").manual_seed(1)
    width = HK * D
    kv_all = torch.randn(n_images, S, layers * 2 * width, device="cuda", dtype=torch.bfloat16, generator=g)
    k = kv_all[..., :width].unflatten(-1, (HK, D))  # layer 0's column slices, strided like decoder.cross_kv
    v = kv_all[..., width:2 * width].unflatten(-1, (HK, D))
    N = n_images * beams
    q = torch.randn(N, H, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    index = torch.arange(n_images, dtype=torch.int32, device="cuda").repeat_interleave(beams)
    lens = torch.full((n_images,), S, dtype=torch.int32, device="cuda")
    nbytes = 2 * n_images * S * width * 2 + 2 * N * H * D * 2
    row = {"images": n_images, "beams": beams, "encoder_tokens": S, "bytes": nbytes}
    ours = lambda: ops.cross_decode_attention(q, k, v, index, lens, scale=SCALE, softcap=SOFTCAP,
                                              backend="ext")
    ref = lambda: ops.cross_decode_attention_reference(q, k, v, index, lens, SCALE, SOFTCAP)
    ref64 = ops.cross_decode_attention_reference(q.double(), k.double(), v.double(), index, lens, SCALE, SOFTCAP)
    row["check"] = check(ours(), ref64, ref())
    for name, fn in (("cuda", ours), ("torch", ref)):
        t = bench(fn)
        row[name] = {"us": t, "GBps": nbytes / t * 1e-3, "pct_peak": 100 * nbytes / t * 1e-3 / peak}
    return row


def rope_point(B, C):
    """The fused RoPE + append vs the unfused model path (Rotary.cos_sin, rotate, index_put into the ring slot)."""
    from florenz_fast.gemma_decoder import Rotary

    g = torch.Generator(device="cuda").manual_seed(2)
    rotary = Rotary(D, 10000.0).cuda()
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, 1, HK, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    v = torch.randn(B, 1, HK, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    kc = torch.zeros(B, HK, C, D, device="cuda", dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)
    lens = torch.full((B,), C + 5, dtype=torch.int32, device="cuda")

    def unfused():
        pos = lens.long()[:, None] - 1
        cos, sin = rotary.cos_sin(pos, q.dtype)
        qr, kr = Rotary.rotate(q, k, cos, sin)
        slot = (pos % C)[:, 0]
        b = torch.arange(B, device="cuda")
        kc[b, :, slot] = kr[:, :, 0]
        vc[b, :, slot] = v[:, :, 0]
        return qr

    fused = lambda: ops.rope_kv_append(q, k, v, kc, vc, lens, rotary.inv_freq, backend="ext")
    qa, kca = unfused(), kc.clone()
    qb = fused()
    diff = max((qa.float() - qb.float()).abs().max().item(), (kca.float() - kc.float()).abs().max().item())
    row = {"batch": B, "cache": C, "max_diff_vs_unfused": diff}
    for name, fn in (("fused", fused), ("unfused", unfused)):
        row[name] = {"us": bench(fn)}
        graph = torch.cuda.CUDAGraph()
        fn()
        with torch.cuda.graph(graph):
            fn()
        row[name]["us_cuda_graph"] = bench(graph.replay)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="results folder (default bench/results/<device>)")
    ap.add_argument("--peak-gbs", type=float, default=3350.0, help="HBM peak in GB/s (H100 SXM: 3350)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_decode.py needs a CUDA GPU")
    loaded, message = ops.extension_status()
    if not loaded:
        sys.exit(f"bench_decode.py needs the CUDA extension: {message}")
    try:
        from flash_attn import flash_attn_with_kvcache as flash
    except ImportError:
        flash = None
    device = torch.cuda.get_device_name()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   device.replace(" ", "_"))
    os.makedirs(out, exist_ok=True)
    res = {"device": device, "torch": torch.__version__, "peak_GBps": args.peak_gbs,
           "flash_attn": flash is not None, "shapes": {"H": H, "Hk": HK, "D": D, "softcap": SOFTCAP},
           "decode": [], "cross": [], "rope_kv_append": []}
    for B, C in [(64, 2048), (64, 4096), (64, 8192), (1, 2048), (1, 4096), (1, 8192)]:
        res["decode"].append(decode_point(B, C, args.peak_gbs, flash))
        print(json.dumps(res["decode"][-1]), flush=True)
    for n_images in (1, 16):
        res["cross"].append(cross_point(n_images, 4, 577, 26, args.peak_gbs))
        print(json.dumps(res["cross"][-1]), flush=True)
    for B in (1, 64):
        res["rope_kv_append"].append(rope_point(B, 4096))
        print(json.dumps(res["rope_kv_append"][-1]), flush=True)
    with open(os.path.join(out, "decode.json"), "w") as f:
        json.dump(res, f, indent=1)
    md = [f"# Decode kernels on {device} (torch {torch.__version__})", "",
          f"Gemma-2-2B shapes (H {H}, Hk {HK}, D {D}, softcap {SOFTCAP}), bf16, one new token; % of "
          f"{args.peak_gbs:.0f} GB/s.", "",
          "| batch | cache | CUDA us | GB/s | % peak | torch us | flash-attn us | check |",
          "|---|---|---|---|---|---|---|---|"]
    for r in res["decode"]:
        fa = f"{r['flash_attn']['us']:.1f}" if "flash_attn" in r else "n/a"
        md.append(f"| {r['batch']} | {r['cache']} | {r['cuda']['us']:.1f} | {r['cuda']['GBps']:.0f} | "
                  f"{r['cuda']['pct_peak']:.1f} | {r['torch']['us']:.1f} | {fa} | {r['check']['ok']} |")
    md += ["", "Cross-attention decode, 577 encoder tokens, 4 beams per image, strided all-layer K/V slices:", "",
           "| images | sequences | CUDA us | GB/s (unique K/V) | torch us | check |", "|---|---|---|---|---|---|"]
    for r in res["cross"]:
        md.append(f"| {r['images']} | {r['images'] * r['beams']} | {r['cuda']['us']:.1f} | {r['cuda']['GBps']:.0f} "
                  f"| {r['torch']['us']:.1f} | {r['check']['ok']} |")
    md += ["", "RoPE + KV append (one layer, one new token), fused vs the unfused model path:", "",
           "| batch | fused us | unfused us | fused us (graph) | unfused us (graph) | max diff |",
           "|---|---|---|---|---|---|"]
    for r in res["rope_kv_append"]:
        md.append(f"| {r['batch']} | {r['fused']['us']:.1f} | {r['unfused']['us']:.1f} | "
                  f"{r['fused']['us_cuda_graph']:.1f} | {r['unfused']['us_cuda_graph']:.1f} | "
                  f"{r['max_diff_vs_unfused']:.3g} |")
    with open(os.path.join(out, "decode.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
