"""florenz_fast.cli: every command's --help, usage errors (one `error:` line, exit 2), the accepted spellings."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from florenz_fast import cli, scaling
from florenz_fast import eval as eval_mod
from florenz_fast import generate as gen_mod
from florenz_fast import train as train_mod
from florenz_fast.config import apply_overrides

ROOT = Path(__file__).resolve().parents[1]


def _throughput():
    spec = importlib.util.spec_from_file_location("florenz_bench_throughput", ROOT / "bench" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _mains():
    return {"generate": gen_mod.main, "eval": eval_mod.main, "train": train_mod.main, "scaling": scaling.main,
            "throughput": _throughput().main}


def _row(out: str, name: str) -> str:
    rows = [line for line in out.splitlines() if line.split()[:1] == [name]]
    assert len(rows) == 1, (name, out)
    return rows[0]


@pytest.mark.parametrize("command,name,default", [
    ("generate", "--num_beams", "4"), ("generate", "--ckpt", "(required)"), ("generate", "--prefix", "false"),
    ("eval", "--xm3600_langs", "en,de,fr,es,ru,zh"), ("eval", "--out", "(required)"),
    ("train", "--optim.lr", "0.002"), ("train", "--data.mode", "packed"), ("train", "--model.decoder.layers", "3"),
    ("throughput", "--preset", "small"), ("throughput", "--new_tokens", "64"),
])
def test_help_lists_the_config_tree(command, name, default, capsys):
    for flag in ("--help", "-h"):
        assert _mains()[command]([flag]) == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: ") and default in _row(out, name).split()


def test_help_shows_types_and_docs(capsys):
    assert gen_mod.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "Inference: cached greedy and beam search" in out  # the command's one-line description
    row = _row(out, "--cuda_graph")
    assert "bool" in row and "capture the decode step in a CUDA graph" in row
    assert "str | None" in _row(out, "--tokenizers")
    assert train_mod.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "tuple[int, ...]" in _row(out, "--model.vision.depths") and "{gemma2,bart}" in out
    assert "spec (SPEC §7" in _row(out, "--trainable")  # a doc from the comment lines above the field


def test_scaling_help(capsys):
    assert scaling.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "num_beams" in out and "runs/scaling" in out


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


REQUIRED = {"generate": ["--ckpt=x", "--image=y.png"], "eval": ["--ckpt=x", "--out=y"], "train": [],
            "scaling": [], "throughput": []}


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_unknown_key_is_one_error_line(command, capsys):
    assert _mains()[command](REQUIRED[command] + ["--no_such_key=1"]) == 2
    assert "'no_such_key'" in _one_error(capsys)


@pytest.mark.parametrize("command,key", [("generate", "num_beams"), ("eval", "num_beams"), ("train", "steps"),
                                         ("scaling", "num_beams"), ("throughput", "beams")])
def test_bad_value_names_the_field(command, key, capsys):
    assert _mains()[command](REQUIRED[command] + [f"--{key}=abc"]) == 2
    line = _one_error(capsys)
    assert key in line and "'abc'" in line


def test_validation_and_required_fields(capsys):
    assert gen_mod.main(["--image=a.png"]) == 2
    assert "--ckpt" in _one_error(capsys)
    assert gen_mod.main(["--ckpt=c"]) == 2  # --image / --batch: exactly one
    assert "image, batch" in _one_error(capsys)
    assert gen_mod.main(["--ckpt=c", "--image=a.png", "--batch=b.jsonl"]) == 2
    assert "got both" in _one_error(capsys)
    assert gen_mod.main(["--ckpt=c", "--image=a.png", "--task=summarise"]) == 2
    assert "task must be one of" in _one_error(capsys)
    assert gen_mod.main(["--ckpt=c", "--image=a.png", "--dtype=fp8"]) == 2
    assert "dtype" in _one_error(capsys)
    assert eval_mod.main(["--ckpt=c", "--out=o", "--dtype=fp8"]) == 2
    assert "dtype" in _one_error(capsys)
    assert _throughput().main(["--mode=fast"]) == 2
    assert "mode must be one of" in _one_error(capsys)
    assert train_mod.main(["--recipe=pretrain"]) == 2  # a KeyError of train's own, as one line
    assert _one_error(capsys) == "error: unknown recipe 'pretrain'; known: tiny, cpt, finetune"
    assert gen_mod.main(["--ckpt=c", "--image"]) == 2
    assert "needs a value" in _one_error(capsys)
    assert gen_mod.main(["--ckpt=c", "stray"]) == 2
    assert "'stray'" in _one_error(capsys)


def test_spellings():
    old = cli.parse(gen_mod.GenerateConfig, ["--ckpt", "c", "--image", "a.png", "--num-beams", "2",
                                             "--max-new-tokens=6", "--prefix", "--cuda-graph", "lang=de"])
    new = cli.parse(gen_mod.GenerateConfig, ["--ckpt=c", "--image=a.png", "--num_beams=2", "--max_new_tokens=6",
                                             "--prefix=true", "--cuda_graph=yes", "--lang=de"])
    assert old == new
    assert (new.num_beams, new.max_new_tokens, new.prefix, new.cuda_graph, new.lang) == (2, 6, True, True, "de")
    assert new.batch is None and new.tokenizers is None and new.device == "auto"
    assert cli.parse(gen_mod.GenerateConfig, ["--ckpt=c", "--image=a", "--prefix", "--prefix=false"]).prefix is False
    # a value that starts with a single dash is a value
    assert cli.parse(train_mod.TrainConfig, ["--optim.min-lr-ratio", "-0.5"]).optim.min_lr_ratio == -0.5
    # train: --recipe / --preset first, whatever their position, with the dashed spelling too
    cfg = cli.parse(train_mod.TrainConfig, ["--optim.lr", "5e-4", "--recipe", "cpt", "--preset=florenz-11.2b",
                                            "--data.max-decoder-tokens", "64"], train_mod.parse_args)
    assert cfg.recipe == "cpt" and cfg.model.name == "florenz-11.2b" and cfg.optim.lr == 5e-4
    assert cfg.data.max_decoder_tokens == 64 and cfg.precision == "fp16"


@dataclass
class _Inner:
    depth: int = 2  # how deep


@dataclass
class _Outer:
    """A demo command's config."""

    name: str  # required: no default
    # the comment above
    ratio: float = 0.5
    tags: tuple[int, ...] = (1, 2)
    inner: _Inner = field(default_factory=_Inner)


def test_layer_on_a_small_config(capsys):
    assert cli.main(_Outer, lambda c: None, ["--help"], prog="demo", description="Demo.\n\nMore.") == 0
    out = capsys.readouterr().out
    assert out.splitlines()[:2] == ["usage: demo [--key=value ...]", "Demo."]
    assert _row(out, "--name").split()[1:] == ["str", "(required)", "required:", "no", "default"]
    assert "the comment above" in _row(out, "--ratio") and "1,2" in _row(out, "--tags")
    assert "how deep" in _row(out, "--inner.depth")
    seen = []
    assert cli.main(_Outer, seen.append, ["name=x", "--inner.depth", "5", "--tags=3,4"], prog="demo") == 0
    assert seen == [_Outer(name="x", tags=(3, 4), inner=_Inner(depth=5))]
    assert cli.main(_Outer, lambda c: 7, ["--name=x"], prog="demo") == 7  # run's int is the exit status
    assert cli.main(_Outer, seen.append, ["--inner=3", "--name=x"], prog="demo") == 2
    _one_error(capsys)
    # apply_overrides itself keeps its messages
    with pytest.raises(ValueError, match="unknown key 'deep' in _Inner"):
        apply_overrides(_Outer(name="x"), ["inner.deep=1"])
