"""`make train`'s job: the tiny model over-fits a fixed batch and writes a loadable checkpoint."""

from __future__ import annotations

import torch

from florenz_fast.convert import load_pretrained
from florenz_fast.train import main, synthetic_batch


def test_overfit_job_lowers_the_loss_and_saves(tmp_path, capsys):
    assert main(["--steps=40", f"--out={tmp_path / 'ck'}"]) == 0
    out = capsys.readouterr().out
    first, last = (float(x) for x in out.split("\nloss ")[1].split(" in ")[0].split(" -> "))
    assert last < 0.5 * first
    model = load_pretrained(tmp_path / "ck")
    pixels, prompt, dec_in, labels = synthetic_batch(model.cfg, 4, 12, 16, 0)
    with torch.no_grad():
        loss = model(pixels, prompt, dec_in, labels=labels).loss.item()
    assert abs(loss - last) < 0.5 * last  # the saved weights are the trained ones (one more step was taken)


def test_overfit_job_fails_loudly_when_it_cannot_learn(tmp_path):
    assert main(["--steps=3", "--lr=0.0", "--out="]) == 1
