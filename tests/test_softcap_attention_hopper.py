"""florenz_kernels.softcap_attention_hopper (the opt-in Hopper path) against the float64 references.

On CPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1, tests/helpers/triton_interpreter.py), which
emulates tensor descriptors: the TMA load/store path itself runs here (test_tma_path_is_the_one_that_ran proves it),
and the masked-pointer fallback is run too (use_tma=False, and a head dim whose rows are not 16-byte aligned). The
one piece without an interpreter emulation is the TMA reduce-add of dQ: on CPU dQ goes through pointer atomics
(tl.atomic_add), on the GPU through the reduce-add (test_gpu_*). The interpreter's bf16 tl.dot is wrong (DESIGN.md):
CPU runs cover fp32 (the accurate tanh) and fp16 (the exp2-form tanh); bf16 (tanh.approx) runs on the GPU.

Rule (DESIGN.md 3): max error against the float64 reference within 2x the error of the same reference computed in
the kernel's dtype, plus 32 fp32 ulps at the tensor's scale (tests/helpers/softcap_cases.assert_within_2x, the
default path's tests' rule, with the same reasons).

Static checks (no GPU): every autotune config of both kernels compiles for sm_90 with HGMMA, no spills, and the
registers and shared memory its comment budgets (florenz_kernels.softcap_attention_hopper.CONFIGS).

Shape legend: B batch, H query heads, Hk kv heads, L queries, S keys, D head dim, T / Tk packed tokens.
"""

from __future__ import annotations

import pytest
import torch

from florenz_kernels import softcap_attention as sa
from florenz_kernels import softcap_attention_hopper as sh
from tests.helpers.ci import skip_or_fail
from tests.helpers.softcap_cases import assert_within_2x, case_tensors, kpm_holes, ops_fwd_bwd
from tests.helpers.static_reports import compile_reports
from tests.helpers.triton_interpreter import DEVICE

if DEVICE == "cpu" and not sh.INTERPRET:
    skip_or_fail("florenz_kernels.softcap_attention_hopper was imported without TRITON_INTERPRET=1")

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # tiny tensors (tests/conftest.py)


def hopper_fwd_bwd(q, k, v, g, kw, **opts):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = sh.softcap_attention_hopper(q, k, v, **kw, **opts)
    out.backward(g)
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def check_hopper(c, dtype, device=DEVICE, **opts):
    """out, dq, dk, dv by the 2x rule against ops.attention(backend="torch") in float64; lse against the float64
    reference: -inf exactly where a row sees nothing, else within 1e-5 (fp32) / 2e-2 (16-bit) of its scale."""
    q, k, v, g, kw = case_tensors(c, dtype, device)
    out, lse, dq, dk, dv = hopper_fwd_bwd(q, k, v, g, kw, **opts)
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.stride() == q.stride()
    r64 = ops_fwd_bwd(q.double(), k.double(), v.double(), g.double(), kw, "torch")
    rlow = ops_fwd_bwd(q, k, v, g, kw, "torch")
    for name, ours, ref64, ref_low in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), r64, rlow):
        assert_within_2x(ours, ref64, ref_low, f"{name} {dtype} {opts}")
    _, ref_lse = sh.softcap_attention_reference(q.double(), k.double(), v.double(), **kw)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite) and (lse[~finite] == float("-inf")).all()
    if finite.any():
        err = (lse.double()[finite] - ref_lse[finite]).abs().max().item()
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert err <= tol * max(1.0, ref_lse[finite].abs().max().item()), f"lse error {err:.3g}"


# ---- the CPU grid (interpreter) ------------------------------------------------------------------------------

CASES = {
    # head dim 256 (Gemma-2), the backward at lengths 1, 7, 97, 257; bounded logits (see the default path's tests:
    # with |s| ~ 30 the fp32 LSE itself carries ulp(30))
    "D256_L1": dict(B=2, H=2, Hk=1, L=1, D=256, softcap=5.0),
    "D256_L7_gqa2": dict(B=1, H=4, Hk=2, L=7, D=256, softcap=5.0, scale=1.0),
    "D256_L97_window": dict(B=1, H=2, Hk=1, L=97, D=256, window=40, softcap=20.0),
    "D256_L257_causal": dict(B=1, H=2, Hk=2, L=257, D=256, softcap=50.0),
    # masks and layouts at small head dims: windows <, > L, GQA 8:1, bottom-right alignment both ways, non-causal
    # with a key padding mask (holes, a fully padded batch row, a row that sees nothing), odd head dims
    "L97_gqa8_window": dict(B=1, H=8, Hk=1, L=97, D=32, window=16, softcap=3.0),
    "L33_window>L": dict(B=2, H=2, Hk=2, L=33, D=16, window=200, softcap=2.0, scale=1.0),
    "L7_S97_decodeish": dict(B=2, H=4, Hk=2, L=7, S=97, D=32, window=16, softcap=3.0),
    "L97_S7_emptyrows": dict(B=1, H=2, Hk=1, L=97, S=7, D=16, softcap=3.0),
    "kpm_causal_window": dict(B=3, H=4, Hk=2, L=33, D=16, window=9, softcap=2.0, kpm="holes"),
    "kpm_cross_D80": dict(B=3, H=2, Hk=1, L=9, S=33, D=80, causal=False, kpm="holes"),
    # packed (varlen): ragged cu_seqlens with a length-1 and an empty segment; packed cross and causal cross
    "packed_ragged": dict(H=4, Hk=2, D=32, lengths=[1, 7, 97, 0, 33], softcap=3.0, window=24),
    "packed_ragged_D256": dict(H=2, Hk=1, D=256, lengths=[1, 40, 0, 7, 19], softcap=50.0),
    "packed_cross": dict(H=4, Hk=1, D=32, lengths=[3, 1, 0, 5, 2], lengths_k=[4, 0, 6, 9, 1], causal=False,
                         softcap=3.0),
    "packed_cross_causal": dict(H=2, Hk=1, D=16, lengths=[1, 7, 5, 3], lengths_k=[97, 7, 4, 1], window=3),
}
FP16 = ["D256_L7_gqa2", "D256_L97_window", "L97_gqa8_window", "kpm_causal_window", "packed_ragged",
        "packed_ragged_D256", "packed_cross"]
_CPU_ONLY = pytest.mark.skipif(not sh.INTERPRET, reason="fp32 has no Hopper configs on the GPU (module docstring)")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_fp32_forward_backward(name):
    check_hopper(kpm_holes(CASES[name]), torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("name", FP16)
def test_fp16_forward_backward(name):
    # fp16: the exp2-form tanh (TANH = 1), the mode the fp32 grid does not run
    check_hopper(kpm_holes(CASES[name]), torch.float16)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["D256_L97_window", "packed_ragged", "kpm_causal_window", "L7_S97_decodeish"])
def test_deterministic_separate_dq_pass(name):
    # deterministic=True: this kernel without dQ, the default path's dQ kernel for it
    check_hopper(kpm_holes(CASES[name]), torch.float32, deterministic=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["D256_L97_window", "packed_ragged", "kpm_cross_D80"])
def test_pointer_fallback(name):
    check_hopper(kpm_holes(CASES[name]), torch.float32, use_tma=False)


def test_unaligned_head_dim_falls_back_to_pointer_loads():
    # fp16 D = 20: 40-byte rows break TMA's 16-byte stride rule; the call takes the pointer loads, same contract
    c = dict(B=1, H=2, Hk=1, L=13, D=20, softcap=3.0, window=5)
    q, k, v, _, _ = case_tensors(c, torch.float16)
    assert not sh.tma_ok(q, k, v) and sh.tma_ok(*case_tensors(dict(c, D=24), torch.float16)[:3])
    check_hopper(c, torch.float16)


def test_tma_path_is_the_one_that_ran(monkeypatch):
    # the interpreter builds a tensor descriptor for every TMA tile source: count them for the default call and for
    # use_tma=False (none); the outputs of both paths agree to fp32 rounding
    if not sh.INTERPRET:
        pytest.skip("interpreter-only probe")
    from triton.runtime import interpreter

    made = []
    real = interpreter.InterpreterBuilder.create_make_tensor_descriptor

    def spy(self, *args, **kwargs):
        made.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_make_tensor_descriptor", spy)
    q, k, v, g, kw = case_tensors(dict(B=1, H=2, Hk=1, L=9, D=16, softcap=2.0), torch.float32)
    a = hopper_fwd_bwd(q, k, v, g, kw)
    n_tma = len(made)
    b = hopper_fwd_bwd(q, k, v, g, kw, use_tma=False)
    # forward: q, k, v, out per program (1 query block x 2 heads); backward: k, v, q[G], dO[G], dK, dV per program
    # (1 key block x 1 kv head); the pointer path makes none
    assert n_tma == 2 * 4 + 1 * 6 and len(made) == n_tma
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_lse_is_differentiable_packed():
    c = dict(H=4, Hk=2, D=16, lengths=[1, 9, 13], softcap=3.0)
    q, k, v, g, kw = case_tensors(c, torch.float32)
    gl = torch.randn(4, 23, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    q1, k1, v1 = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = sh.softcap_attention_hopper(q1, k1, v1, **kw)
    ((out * g).sum() + (lse * gl).sum()).backward()
    q2, k2, v2 = (t.double().requires_grad_() for t in (q, k, v))
    ro, rl = sh.softcap_attention_reference(q2, k2, v2, **kw)
    ((ro * g.double()).sum() + (rl * gl.double()).sum()).backward()
    for ours, ref in ((q1.grad, q2.grad), (k1.grad, k2.grad), (v1.grad, v2.grad)):
        err = (ours.double() - ref).abs().max().item()
        assert err <= 1e-5 * max(1.0, ref.abs().max().item()), err


def test_transposed_inputs_keep_strides():
    q, k, v, g, kw = case_tensors(dict(B=2, H=4, Hk=2, L=13, D=16, softcap=2.0), torch.float32)
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    out_t, lse_t, dq_t, dk_t, dv_t = hopper_fwd_bwd(qt, kt, vt, g, kw)
    out, lse, dq, dk, dv = hopper_fwd_bwd(q, k, v, g, kw)
    assert out_t.stride() == qt.stride() and dq_t.stride() == qt.stride() and dk_t.stride() == kt.stride()
    for x, y in ((out_t, out), (lse_t, lse), (dk_t, dk), (dv_t, dv)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    torch.testing.assert_close(dq_t, dq, rtol=0, atol=1e-6)  # atomics: the same sums, possibly reordered


def test_invalid_inputs_raise():
    q = torch.zeros(1, 4, 5, 16, device=DEVICE)
    k = torch.zeros(1, 2, 5, 16, device=DEVICE)
    with pytest.raises(ValueError, match="softcap_attention_hopper: a sliding window is only defined for causal"):
        sh.softcap_attention_hopper(q, k, k, causal=False, window=3)
    with pytest.raises(ValueError, match="softcap_attention_hopper: 3 query heads are not a multiple"):
        sh.softcap_attention_hopper(torch.zeros(1, 3, 5, 16, device=DEVICE), k, k)
    with pytest.raises(ValueError, match="head dim 320 must be <= 256"):
        z = torch.zeros(1, 2, 5, 320, device=DEVICE)
        sh.softcap_attention_hopper(z, z, z)
    with pytest.raises(ValueError, match="fp16/bf16/fp32"):
        sh.softcap_attention_hopper(q.double(), k.double(), k.double())
    with pytest.raises(ValueError, match="window must be >= 0"):
        sh.softcap_attention_hopper(q, k, k, window=-1)


def test_default_path_is_untouched():
    # the Hopper path is opt-in: the default op and the ops backend still run florenz_kernels.softcap_attention
    from florenz_fast import ops

    assert hasattr(torch.ops.florenz, "softcap_attention_fwd") and hasattr(torch.ops.florenz,
                                                                           "softcap_attention_hopper_fwd")
    q, k, v, g, kw = case_tensors(dict(B=1, H=2, Hk=1, L=9, D=16, softcap=2.0), torch.float32)
    out_default, _ = sa.softcap_attention(q, k, v, **kw)
    out_ops = ops.attention(q, k, v, backend="triton", **kw)
    torch.testing.assert_close(out_ops, out_default, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_opcheck(layout):
    if layout == "padded":
        q, k, v, _, _ = case_tensors(dict(B=2, H=4, Hk=2, L=9, S=11, D=16), torch.float32)
        kpm = torch.ones(2, 11, dtype=torch.bool, device=DEVICE)
        kpm[1, 3] = False
        args = (q, k, v, None, None, kpm, 9, 11, 0.25, 3.0, True, 4, True, False)
    else:
        q, k, v, _, kw = case_tensors(dict(H=4, Hk=2, D=16, lengths=[1, 6, 4]), torch.float32)
        args = (q, k, v, kw["cu_seqlens_q"], kw["cu_seqlens_k"], None, 6, 6, 0.25, 3.0, True, 4, True, True)
    for t in args[:3]:
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.florenz.softcap_attention_hopper_fwd.default, args)
    plain = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in args)
    out, lse = torch.ops.florenz.softcap_attention_hopper_fwd(*plain)
    # deterministic=True: atomics would make opcheck's repeated runs differ in the last bits
    torch.library.opcheck(torch.ops.florenz.softcap_attention_hopper_bwd.default,
                          (torch.randn_like(out), *plain[:3], out, lse, None, *plain[3:-1], True))


# ---- static GPU checks (no GPU): every config of both kernels for sm_90 ----------------------------------------

_STATIC_SCRIPT = r"""
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
import torch
from florenz_kernels import softcap_attention_hopper as sh

def one(job):
    kind, d, dt, i, variant = job
    cfg = sh.CONFIGS[kind][sh._d_class(d)][2][i]
    r = sh.static_resource_report_hopper(kind, d, getattr(torch, dt), cfg, **variant)
    r.pop("raw")
    r["config"] = [cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages]
    r["index"] = i
    r["budget"] = dict(registers=cfg.registers, shared=cfg.shared, ctas_per_sm=cfg.ctas_per_sm)
    r["variant"] = variant
    return r

VARIANTS = [{}, dict(varlen=True), dict(causal=False, window=False, kpm=True),
            dict(varlen=True, causal=False, window=False)]
BWD_ONLY = [dict(compute_dq=False), dict(dq_tma=False)]
# the pointer-load fallback runs on the GPU for head dims up to 128 only (the launcher refuses it at 256, where the
# backward's variant spills 96 B: sh._plan_tma)
POINTER = [dict(use_tma=False)]
jobs = []
for kind, by_d in sh.CONFIGS.items():
    for dclass, by_elem in by_d.items():
        for i, _ in enumerate(by_elem[2]):
            for variant in VARIANTS + (BWD_ONLY if kind == "bwd" else []) + (POINTER if dclass < 256 else []):
                jobs.append((kind, dclass, "bfloat16", i, variant))
            jobs.append((kind, dclass, "float16", i, {}))  # the exp2-form tanh
"""


@pytest.fixture(scope="module")
def static_reports():
    return compile_reports(_STATIC_SCRIPT, pool=True)


@pytest.mark.slow
def test_static_every_config_compiled(static_reports):
    want = {(kind, d, i) for kind, by_d in sh.CONFIGS.items() for d, by_e in by_d.items()
            for i in range(len(by_e[2]))}
    for r in static_reports:  # the table behind the budgets in CONFIGS' comments (pytest -s shows it)
        print(r["kind"], r["head_dim"], r["dtype"], r["config"], r["variant"], "regs", r["registers"], "shared",
              r["shared"], "hgmma", r["hgmma"], "stack", r["stack"])
    got = {(r["kind"], sh._d_class(r["head_dim"]), r["index"]) for r in static_reports}
    assert got == want and 256 in sh.CONFIGS["fwd"] and 256 in sh.CONFIGS["bwd"]
    assert all(r["sm"] == 90 for r in static_reports)


@pytest.mark.slow
def test_static_hgmma_present(static_reports):
    bad = [(r["kind"], r["head_dim"], r["dtype"], r["config"], r["variant"]) for r in static_reports
           if r["hgmma"] == 0]
    assert not bad, f"configs without wgmma (HGMMA) on sm_90: {bad}"


@pytest.mark.slow
def test_static_no_spills(static_reports):
    bad = [(r["kind"], r["head_dim"], r["dtype"], r["config"], r["variant"], r["stack"], r["local"],
            r["spill_insts"]) for r in static_reports if r["stack"] or r["local"] or r["spill_insts"]]
    assert not bad, f"configs that spill (kind, D, dtype, config, variant, STACK, LOCAL, LDL/STL): {bad}"


@pytest.mark.slow
def test_static_registers_and_shared_within_the_claimed_occupancy(static_reports):
    bad = []
    for r in static_reports:
        b, threads = r["budget"], 32 * r["num_warps"]
        ok = (r["registers"] <= b["registers"] and r["registers"] * threads * b["ctas_per_sm"] <= 65536
              and r["shared"] <= b["shared"] and r["shared"] * b["ctas_per_sm"] <= 233472
              and r["shared"] <= sa.SHARED_LIMIT[(9, 0)])
        if not ok:
            bad.append((r["kind"], r["head_dim"], r["dtype"], r["config"], r["variant"], r["registers"],
                        r["shared"], b))
    assert not bad, f"configs over their register / shared-memory budget: {bad}"


# ---- GPU (skipped without CUDA): bf16 at real sizes -----------------------------------------------------------

GPU_CASES = {
    "gemma2b_causal_L1024": dict(B=2, H=8, Hk=4, L=1024, D=256, softcap=50.0, scale=256 ** -0.5),
    "gemma9b_window_L2048": dict(B=1, H=16, Hk=8, L=2048, D=256, softcap=50.0, scale=256 ** -0.5, window=512),
    "D256_L4096_causal": dict(B=1, H=8, Hk=4, L=4096, D=256, softcap=50.0, scale=256 ** -0.5),
    "D256_L97_window": dict(B=2, H=4, Hk=2, L=97, D=256, softcap=50.0, window=40),
    "D256_L1": dict(B=2, H=4, Hk=2, L=1, D=256, softcap=50.0),
    "D256_L7": dict(B=2, H=4, Hk=2, L=7, D=256, softcap=50.0),
    "D256_L257": dict(B=2, H=4, Hk=2, L=257, D=256, softcap=50.0),
    "packed_ragged": dict(H=8, Hk=4, D=256, lengths=[1, 513, 7, 1000, 0, 97], softcap=50.0, window=128),
    "packed_cross": dict(H=8, Hk=2, D=256, lengths=[5, 130, 1, 64], lengths_k=[577, 0, 577, 100], causal=False,
                         softcap=50.0),
    "kpm_cross": dict(B=3, H=4, Hk=4, L=300, S=577, D=256, causal=False, softcap=50.0, kpm="holes"),
}


def _hopper_gpu():
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the Hopper path needs sm_90+ (it raises a ValueError saying so elsewhere)")


# deterministic=True for two cases only: each mask variant is one more compile of two kernels (~10 s each on the
# lent machine), and bench/gpu_suite.sh gives all `gpu` tests 150 s
GPU_GRID = [(n, False) for n in GPU_CASES] + [("D256_L4096_causal", True), ("packed_ragged", True)]


@pytest.mark.gpu
@pytest.mark.parametrize("name, deterministic", GPU_GRID)
def test_gpu_bf16_grid(name, deterministic):
    _hopper_gpu()
    check_hopper(kpm_holes(GPU_CASES[name]), torch.bfloat16, device="cuda", deterministic=deterministic)


@pytest.mark.gpu
def test_gpu_fp16():
    _hopper_gpu()
    check_hopper(dict(B=2, H=8, Hk=4, L=300, D=256, softcap=50.0, window=100), torch.float16, device="cuda")


@pytest.mark.gpu
def test_gpu_deterministic_is_bitwise():
    _hopper_gpu()
    q, k, v, g, kw = case_tensors(dict(B=2, H=8, Hk=2, L=1000, D=256, softcap=50.0), torch.bfloat16, "cuda")
    a = hopper_fwd_bwd(q, k, v, g, kw, deterministic=True)
    b = hopper_fwd_bwd(q, k, v, g, kw, deterministic=True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.gpu
def test_gpu_refuses_what_it_has_no_spill_free_kernel_for():
    _hopper_gpu()
    q = torch.zeros(1, 2, 8, 256, device="cuda")
    with pytest.raises(ValueError, match="fp32 q/k/v have no Hopper configs"):
        sh.softcap_attention_hopper(q, q, q)
    with pytest.raises(ValueError, match="head dim 256 needs the TMA loads on the GPU"):
        sh.softcap_attention_hopper(q.bfloat16(), q.bfloat16(), q.bfloat16(), use_tma=False)


@pytest.mark.gpu
def test_gpu_misaligned_view_is_copied_to_tma():
    # a view at a 2-element offset breaks the 16-byte base rule; the launcher copies it and still takes TMA
    _hopper_gpu()
    q, k, v, g, kw = case_tensors(dict(B=1, H=4, Hk=2, L=300, D=256, softcap=50.0), torch.bfloat16, "cuda")
    qm = torch.empty(q.numel() + 2, device="cuda", dtype=q.dtype)[2:].view_as(q).copy_(q)
    assert not sh.tma_ok(qm)
    a = hopper_fwd_bwd(qm, k, v, g, kw, deterministic=True)
    b = hopper_fwd_bwd(q, k, v, g, kw, deterministic=True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
