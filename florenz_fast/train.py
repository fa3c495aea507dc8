"""Training entry point. For now: the `tiny` preset over-fitting one fixed synthetic batch on the CPU.

    python -m florenz_fast.train                       # defaults below
    python -m florenz_fast.train --steps=300 --lr=1e-3 --preset=tiny-bart

This is a real optimisation of the whole model (SPEC §7 trainable policy, AdamW, cross-entropy on softcapped
logits), small enough to finish in seconds; the full training engine (packing, checkpointing, FSDP2, resume)
replaces this loop in a later change. The run ends non-zero if the loss did not fall.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .config import apply_overrides, get_config
from .convert import save_pretrained
from .florenz import IGNORE_INDEX, Florenz, apply_trainable_policy


@dataclass
class OverfitConfig:
    preset: str = "tiny"
    steps: int = 150
    batch: int = 4
    prompt_len: int = 12
    target_len: int = 16
    lr: float = 3e-3
    seed: int = 0
    out: str = "runs/overfit-tiny"  # checkpoint written here at the end ("" to skip)


def synthetic_batch(cfg, batch: int, prompt_len: int, target_len: int, seed: int):
    """Images of coloured squares on noise, random prompts, and targets that depend on the image."""
    g = torch.Generator().manual_seed(seed)
    S = cfg.image_size
    pixels = torch.randn(batch, 3, S, S, generator=g) * 0.1
    for i in range(batch):  # one bright square per image, its colour and place drawn per sample
        y, x = torch.randint(0, S // 2, (2,), generator=g).tolist()
        pixels[i, :, y:y + S // 2, x:x + S // 2] += torch.randn(3, 1, 1, generator=g)
    prompt = torch.randint(3, cfg.encoder.vocab_size, (batch, prompt_len), generator=g)
    body = torch.randint(3, cfg.decoder.vocab_size, (batch, target_len - 2), generator=g)
    labels = torch.cat([torch.full((batch, 1), 2), body, torch.full((batch, 1), 1)], dim=1)  # [bos, ..., eos]
    labels[-1, -3:] = IGNORE_INDEX  # one shorter target: padding is ignored by the loss
    decoder_input = torch.cat([torch.full((batch, 1), 1), labels[:, :-1].clamp(min=0)], dim=1)  # start = eos
    return pixels, prompt, decoder_input, labels


def main(argv: list[str] | None = None) -> int:
    run = apply_overrides(OverfitConfig(), list(sys.argv[1:] if argv is None else argv))
    torch.manual_seed(run.seed)
    # Over-fitting drives activations and gradients into subnormal floats, which x86 CPUs handle ~100x slower
    # (measured: 150 tiny steps took 117 s without this, 12 s with it).
    torch.set_flush_denormal(True)
    cfg = get_config(run.preset)
    model = Florenz(cfg).train()
    counts = apply_trainable_policy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=run.lr, weight_decay=0.0)
    pixels, prompt, dec_in, labels = synthetic_batch(cfg, run.batch, run.prompt_len, run.target_len, run.seed)
    tokens = int((labels != IGNORE_INDEX).sum())
    print(f"florenz-fast overfit: preset {cfg.name}, {counts['trainable']:,} trainable / "
          f"{counts['trainable'] + counts['frozen']:,} parameters, batch {run.batch}, {tokens} target tokens, "
          f"{run.steps} steps, AdamW lr {run.lr}")
    losses = []
    start = time.perf_counter()
    bar = tqdm(range(run.steps), desc="overfit", unit="step")
    for step in bar:
        loss = model(pixels, prompt, dec_in, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if step % max(1, run.steps // 10) == 0 or step == run.steps - 1:
            tqdm.write(f"step {step:4d}  loss {losses[-1]:.4f}")
    elapsed = time.perf_counter() - start
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {elapsed:.1f} s "
          f"({tokens * run.steps / elapsed:,.0f} target tokens/s on {pixels.device.type})")
    if run.out:
        print(f"checkpoint: {save_pretrained(model, Path(run.out))}")
    if not losses[-1] < 0.5 * losses[0]:
        print("error: the loss did not fall by half; something is wrong", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
