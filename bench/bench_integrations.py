"""florenz_kernels.integrations.apply_to on transformers' Gemma-2: loss equality in training and the loss's memory.

    python bench/bench_integrations.py                      # CPU: both parts below
    python bench/bench_integrations.py --part train --steps 20
    python bench/bench_integrations.py --part memory --tokens 2048 --vocab 256000 --hidden 256
    python bench/bench_integrations.py --gpu                # CUDA only: Gemma-2-2B shapes at 4k / 8k

CPU parts (raw output in bench/results/cpu/integrations/):
  train   a tiny random Gemma2ForCausalLM (2 layers: one sliding window 5, one global; softcaps 5 / 5) trained for
          N AdamW steps eagerly and, from the same weights, patched by apply_to (Triton interpreter, fp32); every
          step's loss of both and the largest difference (target: <= 1e-5 over 20 steps).
  memory  the peak memory of the loss in training at T tokens x vocab V: a Gemma2ForCausalLM with no decoder layers
          (embedding -> final norm -> lm_head + final softcap 30 + cross-entropy, tied weights), one forward +
          backward with labels, eager (transformers' own path: the (1, T, V) fp32 logits, the softcap's
          intermediates, ForCausalLMLoss) vs apply_to(loss=True) (florenz_kernels.linear_cross_entropy, chunked:
          no logits). The hidden width only sizes the V x D weight and its gradient, which both paths hold; the
          logits (T x V x 4 bytes = 2 GiB at 2048 x 256k) do not depend on it, so D = 256 keeps the CPU matmuls to
          seconds. Method: each path in a fresh process; Linux's peak RSS (VmHWM) is reset once the model and inputs
          exist (writing 5 to /proc/self/clear_refs), and peak - RSS-at-reset is the loss's own memory. glibc
          serves these multi-MiB tensors with mmap and returns them on free, so RSS follows the live tensors: the
          peak is the real high-water mark of what the loss holds, allocator slack included (a tracemalloc-like
          count would miss torch's allocations, which bypass Python's allocator). Target: patched <= 25 % of eager.

GPU part (needs CUDA; refuses to run without it): Gemma-2-2B shapes (26 layers, width 2304, 8 / 4 heads of 256,
window 4096, softcaps 50 / 30, vocab 256k) with random bf16 weights, batch 1 at 4k and 8k tokens, one training
step (forward + backward; no optimizer state) per measurement after a warm-up: tokens/s and
torch.cuda.max_memory_allocated for eager, sdpa (transformers' sdpa ignores the attention softcap: faster but NOT
the same model; shown for reference), florenz (apply_to) and Liger-Kernel (`apply_liger_kernel_to_gemma2` on the
instance, when importable; otherwise reported as absent). Out-of-memory is recorded, not raised. Raw output in
bench/results/<device>/integrations/.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, ROOT / "bench"):  # bench/ too: imported as a module (tests), not only run as a script
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from loss_memory import reset_peak_rss, status_mib  # the process's RSS and its peak, reset per part

# ---- train: N steps eager vs patched (CPU, interpreter) --------------------------------------------------------


def tiny_gemma2(seed: int = 0):
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=5,
                       attn_logit_softcapping=5.0, final_logit_softcapping=5.0, pad_token_id=0,
                       max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    model = Gemma2ForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every parameter random (norm weights init to 0) so no term hides
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def run_train(steps: int, out: Path) -> dict:
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    import torch

    from florenz_kernels.integrations import apply_to

    torch.manual_seed(0)
    eager = tiny_gemma2(4)
    ours = copy.deepcopy(eager)
    record = apply_to(ours)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (eager, ours)]
    losses: dict[str, list[float]] = {"eager": [], "patched": []}
    seconds = {"eager": 0.0, "patched": 0.0}
    for step in range(steps):
        g = torch.Generator().manual_seed(100 + step % 2)  # two batches in turn: memorised, the loss falls
        ids = torch.randint(3, 64, (2, 8), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 6:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        for name, m, opt in (("eager", eager, opts[0]), ("patched", ours, opts[1])):
            m.train()
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = m(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            seconds[name] += time.perf_counter() - t0
            losses[name].append(loss.item())
    diffs = [abs(a - b) for a, b in zip(losses["eager"], losses["patched"])]
    res = {"steps": steps, "record": record.summary(), "losses": losses, "abs_diff": diffs,
           "max_abs_diff": max(diffs), "target_max_abs_diff": 1e-5, "met": max(diffs) <= 1e-5,
           "seconds": seconds, "note": "patched runs the Triton interpreter on the CPU: its seconds are not a speed"}
    (out / "train_tiny_gemma2.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


# ---- memory: the loss at T x V, eager vs patched, one process each -----------------------------------------------


def memory_child(mode: str, T: int, D: int, V: int, threads: int) -> dict:
    os.environ.pop("TRITON_INTERPRET", None)  # fused loss: its per-row part as torch ops on the CPU (same chunks)
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from florenz_kernels.integrations import apply_to

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=V, hidden_size=D, intermediate_size=2 * D, num_hidden_layers=0,
                       num_attention_heads=1, num_key_value_heads=1, head_dim=D, final_logit_softcapping=30.0,
                       max_position_embeddings=T, pad_token_id=0)
    cfg._attn_implementation = "eager"
    model = Gemma2ForCausalLM(cfg).train()
    if mode == "patched":
        apply_to(model, attention=False, rms_norm=False, mlp=False, loss=True)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (1, T), generator=g)
    labels = ids.clone()
    labels[:, ::8] = -100
    reset_peak_rss()
    base = status_mib("VmRSS")
    t0 = time.perf_counter()
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    seconds = time.perf_counter() - t0
    peak = status_mib("VmHWM")
    w = model.lm_head.weight
    return {"mode": mode, "loss": out.loss.item(), "logits_built": out.logits is not None,
            "grad_w_norm": w.grad.norm().item(), "rss_at_reset_mib": base, "peak_rss_mib": peak,
            "loss_peak_mib": peak - base, "weight_grad_mib": w.numel() * 4 / 2**20, "seconds": seconds}


def run_memory(T: int, D: int, V: int, threads: int, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    results = {}
    for mode in ("patched", "eager"):
        res = subprocess.run([sys.executable, __file__, "--memory-child", mode, "--tokens", str(T), "--hidden",
                              str(D), "--vocab", str(V), "--threads", str(threads)], capture_output=True, text=True,
                             env=env)
        if res.returncode:
            raise SystemExit(f"memory {mode} failed (rc {res.returncode}):\n{res.stderr[-3000:]}")
        results[mode] = json.loads(res.stdout.strip().splitlines()[-1])
        print(results[mode], flush=True)
    p, e = results["patched"], results["eager"]
    summary = {"tokens": T, "hidden": D, "vocab": V, "dtype": "fp32", "threads": threads, "patched": p, "eager": e,
               "loss_rel_diff": abs(p["loss"] - e["loss"]) / abs(e["loss"]),
               "grad_w_norm_rel_diff": abs(p["grad_w_norm"] - e["grad_w_norm"]) / e["grad_w_norm"],
               "loss_peak_ratio": p["loss_peak_mib"] / e["loss_peak_mib"], "target_ratio": 0.25}
    summary["met"] = summary["loss_peak_ratio"] <= 0.25
    (out / "loss_memory_gemma2.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ---- GPU: Gemma-2-2B shapes --------------------------------------------------------------------------------------


def run_gpu(lengths: list[int], out_root: Path) -> dict:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench_integrations --gpu needs a CUDA GPU (Gemma-2-2B shapes at 4k / 8k tokens in bf16); "
                         "none is visible here. The CPU parts run without it: drop --gpu.")
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from florenz_kernels.integrations import apply_to

    device = torch.cuda.get_device_name().replace(" ", "_").lower()
    out = out_root / device / "integrations"
    out.mkdir(parents=True, exist_ok=True)
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_gemma2
    except ImportError:
        apply_liger_kernel_to_gemma2 = None
    rows = []
    for L in lengths:
        for mode in ("eager", "sdpa", "florenz", "liger"):
            if mode == "liger" and apply_liger_kernel_to_gemma2 is None:
                rows.append({"mode": mode, "tokens": L, "status": "liger_kernel not importable"})
                continue
            cfg = Gemma2Config(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                               num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                               sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                               max_position_embeddings=8192, pad_token_id=0)
            cfg._attn_implementation = "sdpa" if mode == "sdpa" else "eager"
            torch.manual_seed(0)
            model = Gemma2ForCausalLM(cfg).to("cuda", torch.bfloat16).train()
            model.gradient_checkpointing_enable()
            if mode == "florenz":
                apply_to(model)
            elif mode == "liger":
                apply_liger_kernel_to_gemma2(model=model)
            ids = torch.randint(0, 256000, (1, L), device="cuda")
            row = {"mode": mode, "tokens": L}
            try:
                for it in range(4):  # 1 warm-up + 3 timed
                    if it == 1:
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        t0 = time.perf_counter()
                    model.zero_grad(set_to_none=True)
                    model(input_ids=ids, labels=ids).loss.backward()
                torch.cuda.synchronize()
                row.update(status="ok", tokens_per_s=3 * L / (time.perf_counter() - t0),
                           peak_gib=torch.cuda.max_memory_allocated() / 2**30)
            except torch.cuda.OutOfMemoryError:
                row.update(status="oom")
            rows.append(row)
            print(row, flush=True)
            del model
            torch.cuda.empty_cache()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows,
           "note": "sdpa drops Gemma-2's attention softcap (not the same model); activation checkpointing on for all"}
    (out / "gemma2_2b.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


def _markdown(train: dict | None, mem: dict | None) -> str:
    md = "# apply_to on transformers Gemma-2 (CPU)\n\n"
    if train:
        md += (f"Training, tiny Gemma2ForCausalLM, {train['steps']} AdamW steps, eager vs patched ({train['record']}): "
               f"max |loss difference| = {train['max_abs_diff']:.2e} (target <= 1e-5: "
               f"{'met' if train['met'] else 'NOT met'}); first / last eager loss "
               f"{train['losses']['eager'][0]:.4f} / {train['losses']['eager'][-1]:.4f}.\n\n")
    if mem:
        e, p = mem["eager"], mem["patched"]
        md += (f"Loss memory, forward + backward, {mem['tokens']} tokens x vocab {mem['vocab']:,} (hidden "
               f"{mem['hidden']}, fp32, {mem['threads']} threads), peak RSS above the model and inputs:\n\n"
               "| path | loss peak (MiB) | of which dW (MiB) | logits built | seconds | loss |\n"
               "|---|---:|---:|---|---:|---:|\n"
               + "".join(f"| {n} | {r['loss_peak_mib']:,.0f} | {r['weight_grad_mib']:,.0f} | {r['logits_built']} | "
                         f"{r['seconds']:.1f} | {r['loss']:.6f} |\n" for n, r in (("eager", e), ("patched", p)))
               + f"\npatched / eager = {mem['loss_peak_ratio']:.1%} (target <= 25 %: "
                 f"{'met' if mem['met'] else 'NOT met'}); loss relative difference {mem['loss_rel_diff']:.1e}, "
                 f"|dW| relative difference {mem['grad_w_norm_rel_diff']:.1e}.\n")
    return md


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("all", "train", "memory"), default="all")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=256000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gpu", action="store_true", help="Gemma-2-2B shapes on CUDA (needs a GPU)")
    ap.add_argument("--lengths", default="4096,8192", help="--gpu: sequence lengths")
    ap.add_argument("--memory-child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args()
    if a.memory_child:
        print(json.dumps(memory_child(a.memory_child, a.tokens, a.hidden, a.vocab, a.threads)))
        return 0
    if a.gpu:
        print(json.dumps(run_gpu([int(x) for x in a.lengths.split(",")], Path(a.out)), indent=2))
        return 0
    out = Path(a.out) / "cpu" / "integrations"
    out.mkdir(parents=True, exist_ok=True)
    mem = run_memory(a.tokens, a.hidden, a.vocab, a.threads, out) if a.part in ("all", "memory") else None
    train = run_train(a.steps, out) if a.part in ("all", "train") else None
    md = _markdown(train, mem)
    (out / "summary.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
