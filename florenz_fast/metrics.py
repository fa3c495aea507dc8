"""Training observability: analytic FLOPs and MFU, peak memory, NVML readings, JSONL metrics, the loss plot."""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path

import torch

from .config import FlorenzConfig

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) by device name fragment; fp32 without TF32 is far lower and
# MFU is then reported against the bf16 peak (a conservative, comparable number).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def _linear_params(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def forward_flops_per_sample(model: torch.nn.Module, cfg: FlorenzConfig, prompt_tokens: float,
                             target_tokens: float, convention: str = "model") -> dict[str, float]:
    """Forward FLOPs of one sample by part: 2 x (matmul weights) x tokens, plus attention's two matmuls.

    convention "model" (MFU): the useful work: causal self-attention counts half the L x L square, DaViT's window
    attention only the real tokens. "executed": what the reference implementation computes: full L x L squares
    (the mask is applied after the matmul) and the window padding (the map is padded to multiples of the window
    before its qkv/proj and attention); tests/test_throughput.py checks it against FlopCounterMode.
    Vision: every stage's linear and conv weights applied at every location of that stage (convs counted as
    dense matmuls over their kernel). Embedding lookups are free; the tied lm_head is a matmul.
    """
    if convention not in ("model", "executed"):
        raise ValueError(f"convention must be 'model' or 'executed', got {convention!r}")
    executed = convention == "executed"
    v = cfg.vision
    side = cfg.image_size
    vision = 0.0
    for s, conv in enumerate(model.vision_tower.convs):
        side = math.ceil(side / v.patch_stride[s])
        tokens = side * side
        win_tokens = (math.ceil(side / v.window) * v.window) ** 2 if executed else tokens
        blocks = model.vision_tower.blocks[s]
        window_linear = sum(b.spatial_block.window_attn.qkv.weight.numel()
                            + b.spatial_block.window_attn.proj.weight.numel() for b in blocks)
        stage_weights = conv.conv.weight.numel() + sum(
            _linear_params(b) + b.spatial_block.conv1.weight.numel() * 4 for b in blocks) - window_linear
        vision += 2 * stage_weights * tokens + 2 * window_linear * win_tokens
        # window attention (win^2 keys per token) and channel attention (C/groups keys per channel) matmuls
        keys = v.window ** 2 if executed else min(v.window ** 2, tokens)
        for _ in range(v.depths[s]):
            vision += 4 * win_tokens * keys * v.dims[s] + 4 * tokens * v.dims[s] ** 2 / v.heads[s]
    n_img = cfg.num_image_tokens()
    enc_tokens = n_img + prompt_tokens
    projector = 2 * model.projector.image_projection.weight.numel() * n_img
    encoder = (2 * _linear_params(model.encoder) * enc_tokens
               + 4 * cfg.encoder.layers * enc_tokens ** 2 * cfg.encoder.d_model)
    d = cfg.decoder
    attn_width = d.heads * d.head_dim
    self_keys = target_tokens if executed else target_tokens / 2
    decoder = (2 * _linear_params(model.decoder) * target_tokens
               + 4 * d.layers * target_tokens * (self_keys + enc_tokens) * attn_width)
    lm_head = 2 * d.vocab_size * d.hidden * target_tokens
    # the cross-attention k/v projections run over the encoder tokens, not the decoder's
    kv = sum(l.encoder_attn.k_proj.weight.numel() + l.encoder_attn.v_proj.weight.numel() for l in model.decoder.layers)
    decoder += 2 * kv * (enc_tokens - target_tokens)
    return {"vision": vision, "projector": projector, "encoder": encoder, "decoder": decoder + lm_head}


def train_flops_per_sample(model, cfg, prompt_tokens: float, target_tokens: float) -> float:
    """Forward everywhere, backward (2x forward) through the parts that train or lie between them and the loss.

    The frozen vision tower and projector get no backward (nothing upstream of them trains).
    """
    f = forward_flops_per_sample(model, cfg, prompt_tokens, target_tokens)
    return sum(f.values()) + 2 * (f["encoder"] + f["decoder"])


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return rss_kib / 2**20


class NVML:
    """Power and SM clock of the current GPU via nvidia-ml-py, when importable; empty dict otherwise."""

    def __init__(self, device: torch.device):
        self.handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.pynvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        except Exception:  # noqa: BLE001 - no library or no driver access: readings are optional
            self.handle = None

    def read(self) -> dict[str, float]:
        if self.handle is None:
            return {}
        p = self.pynvml
        return {"power_w": p.nvmlDeviceGetPowerUsage(self.handle) / 1000.0,
                "sm_clock_mhz": float(p.nvmlDeviceGetClockInfo(self.handle, p.NVML_CLOCK_SM))}


class MetricsWriter:
    """Appends one JSON object per line; safe to reopen on resume (lines past the resume step are dropped)."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", -1) < resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None and path.exists():
            path.unlink()

    def write(self, record: dict) -> None:
        # strict JSON: a diverged step's NaN loss is written as null (bare NaN, which json.dumps writes by
        # default, is rejected by jq, JavaScript and every other strict parser)
        with self.path.open("a") as f:
            f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")

    def read(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def json_safe(value):
    """`value` with every non-finite float (nan, inf) replaced by None, through dicts, lists and tuples."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def plot_losses(records: list[dict], out_png: Path) -> Path | None:
    """Loss (and per task-language loss) against step; returns the path or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("metrics: matplotlib not importable, no loss plot", file=sys.stderr)
        return None
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    # a non-finite loss (null in metrics.jsonl) is a gap in the curve, and its step a red mark on the x axis
    ax.plot(steps, [r["loss"] if _finite(r.get("loss")) else math.nan for r in records], label="loss (all)",
            color="black", linewidth=2)
    keys = sorted({k for r in records for k in (r.get("loss_by_key") or {})})
    for key in keys:
        pts = [(r["step"], v if _finite(v := r["loss_by_key"][key]) else math.nan) for r in records
               if key in (r.get("loss_by_key") or {})]
        ax.plot(*zip(*pts), label=key, linewidth=1, alpha=0.8)
    bad = [r["step"] for r in records if not _finite(r.get("loss")) or r.get("skipped")]
    if bad:
        ax.plot(bad, [0] * len(bad), linestyle="none", marker="|", markersize=12, color="red",
                transform=ax.get_xaxis_transform(), label=f"skipped step ({len(bad)})", clip_on=False)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / target token)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def sparkline(values: list[float | None], width: int = 40) -> str:
    """A one-line text picture of a curve, for the end-of-run summary; a point holding a non-finite value (nan,
    inf, None: a diverged step) is drawn as `×` and the scale is set by the finite points only."""
    if not values:
        return ""
    ticks = "▁▂▃▄▅▆▇█"
    step = max(1, len(values) // width)
    pts = [sum(chunk) / len(chunk) if all(_finite(v) for v in chunk) else None
           for chunk in (values[i:i + step] for i in range(0, len(values), step))]
    finite = [p for p in pts if p is not None and math.isfinite(p)]  # a sum of huge finite values can overflow
    if not finite:
        return "×" * len(pts)
    lo, hi = min(finite), max(finite)
    span = (hi - lo) or 1.0
    return "".join(ticks[min(7, int((p - lo) / span * 7.999))] if p is not None and math.isfinite(p) else "×"
                   for p in pts)
