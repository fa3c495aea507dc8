"""The model on a CUDA device equals the CPU reference (run where a GPU is present; skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch

from florenz_fast.config import get_config
from florenz_fast.florenz import Florenz
from tests.helpers import error_rule

pytestmark = pytest.mark.gpu


@pytest.fixture
def no_tf32():
    """TF32 off for the test (it would make the fp32 comparison meaningless; the default is off, make sure), and
    the process-wide matmul / cuDNN flags as they were afterwards."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.set_float32_matmul_precision(saved[2])
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[0], saved[1]


@pytest.mark.parametrize("name", ["tiny", "tiny-bart"])
def test_cuda_matches_cpu_fp32_and_bf16(name, no_tf32):
    torch.manual_seed(0)
    cpu = Florenz(get_config(name)).eval()
    with torch.no_grad():
        for n, p in cpu.named_parameters():
            if n.endswith("encoder_attn_gate") or n.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * 0.5)
    cfg = cpu.cfg
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=g)
    prompt = torch.randint(3, cfg.encoder.vocab_size, (2, 9), generator=g)
    dec = torch.randint(3, cfg.decoder.vocab_size, (2, 21), generator=g)
    mask = torch.ones_like(prompt, dtype=torch.bool)
    mask[1, 5:] = False
    with torch.no_grad():
        ref64 = Florenz(cfg).double().eval()
        ref64.load_state_dict(cpu.state_dict())
        want = ref64(pixels.double(), prompt, dec, attention_mask=mask).logits
        cuda = Florenz(cfg).cuda().eval()
        cuda.load_state_dict(cpu.state_dict())
        got32 = cuda(pixels.cuda(), prompt.cuda(), dec.cuda(), attention_mask=mask.cuda()).logits.cpu()
        cpu32 = cpu(pixels, prompt, dec, attention_mask=mask).logits
        got16 = cuda.to(torch.bfloat16)(pixels.cuda().bfloat16(), prompt.cuda(), dec.cuda(),
                                        attention_mask=mask.cuda()).logits.float().cpu()
        cpu16 = cpu.to(torch.bfloat16)(pixels.bfloat16(), prompt, dec, attention_mask=mask).logits.float()
    error_rule.assert_within_2x(got32, want, cpu32, "fp32 (TF32 off: no_tf32)", atol=1e-6)
    # bf16 on the GPU within 2x the error of bf16 on the CPU (both against float64), the flash-attention rule
    error_rule.assert_within_2x(got16, want, cpu16, "bf16")
    assert error_rule.max_error(got16, want) > 0  # bf16 really ran in bf16
