"""Command-line errors everywhere (issue 17 items 5-6) and generate's batch mode losing nothing (issue 16 item 3).

Every CLI answers --help (also into a pipe its reader closed); errors are one `error:` line on stderr with no
traceback, exit 2 for usage errors and 1 for run-time failures, and --debug / FLORENZ_DEBUG=1 shows the
traceback. Batch mode: a bad image or a failing request is an error row (exit 3), rows are kept per chunk in
OUT.partial, and a re-run with the same --out resumes and gives the same file as one clean run.

A few cases run in real processes (two at a time: each is mostly torch's import, 5-10 s on the shared 2-core
machine), the rest in-process (capsys, monkeypatch), all on one tiny checkpoint made once per module.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image

from florenz_fast import cli, scaling
from florenz_fast import eval as eval_mod
from florenz_fast import generate as gen_mod
from florenz_fast import prepare as prepare_mod
from florenz_fast import train as train_mod
from florenz_fast.config import get_config
from florenz_fast.convert import save_pretrained
from florenz_fast.florenz import Florenz
from florenz_fast.images import load_image
from florenz_fast.text import train_decoder_tokenizer, train_encoder_tokenizer

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["a red circle on the left", "ein roter Kreis links", "un cercle rouge", "The image shows",
         "The target language is German. What does the image describe?", "Translate the following text: a dog"]
COLORS = ["red", "green", "blue", "white", "black", "yellow"]
BAD = 3  # the request whose image is unreadable


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height (its pixel data is a stub): PIL's decompression-bomb check runs
    on the header, so the file stays ~60 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("clierr")
    torch.manual_seed(0)
    ckpt = root / "model"
    save_pretrained(Florenz(get_config("tiny")).eval(), ckpt)
    train_encoder_tokenizer(ckpt / "tokenizers" / "encoder", TEXTS, 300)
    train_decoder_tokenizer(ckpt / "tokenizers" / "decoder", TEXTS, 300)
    for i, color in enumerate(COLORS):
        Image.new("RGB", (24 + 8 * i, 20), color).save(root / f"{i}.png")
    (root / "bad.png").write_text("not an image")
    _png_header(root / "bomb.png", 20_000, 20_000)  # 400 M pixels: over 2x MAX_IMAGE_PIXELS, PIL raises
    _png_header(root / "bomb_warn.png", 10_000, 10_000)  # 100 M pixels: over MAX_IMAGE_PIXELS, PIL only warns
    rows = [{"image": "bad.png" if i == BAD else f"{i}.png", "id": f"r{i}", "lang": ("en", "de")[i % 2]}
            for i in range(6)]
    (root / "batch6.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, ckpt


# ---- subprocesses: --help everywhere, one error line, exit codes ---------------------------------------------


def _run(args: list[str], env: dict | None = None, closed_stdout: bool = False) -> tuple[int, str, str]:
    full_env = {k: v for k, v in os.environ.items() if k != cli.DEBUG_ENV}
    full_env |= {"PYTHONPATH": str(ROOT), **(env or {})}
    if closed_stdout:  # `--help | head` whose reader is already gone: every write to stdout fails (EPIPE)
        read, write = os.pipe()
        os.close(read)
        try:
            res = subprocess.run([sys.executable, *args], stdout=write, stderr=subprocess.PIPE, text=True,
                                 cwd=ROOT, env=full_env, timeout=240)
        finally:
            os.close(write)
        return res.returncode, "", res.stderr
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=full_env,
                         timeout=240)
    return res.returncode, res.stdout, res.stderr


def _pool(cases: dict[str, tuple]) -> dict[str, tuple[int, str, str]]:
    with ThreadPoolExecutor(max_workers=2) as ex:  # 2 cores; each child is mostly torch's import
        futures = {name: ex.submit(_run, *case) for name, case in cases.items()}
        return {name: f.result() for name, f in futures.items()}


def _one_error_line(err: str) -> str:
    """stderr holds one `error:` line, last, and no traceback (progress bars above it are fine)."""
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, lines
    return errors[0]


def test_real_processes_exit_codes_and_stderr(tiny):
    """The cases where only a real process shows the truth: the interpreter's own exit status and stderr (an
    uncaught exception, the final flush into a closed pipe)."""
    root, ckpt = tiny
    gen = ["-m", "florenz_fast.generate", f"--ckpt={ckpt}", "--max_new_tokens=2", "--num_beams=2"]
    out = root / "sub" / "out.jsonl"
    results = _pool({
        "train --help | head": (["-m", "florenz_fast.train", "--help"], None, True),
        "unreadable image": (gen + [f"--image={root / 'bad.png'}"],),
        "debug": (gen + [f"--image={root / 'bomb.png'}", "--debug"],),
        "prepare usage": (["-m", "florenz_fast.prepare", "--preset", "tiny"],),
        "batch of 6": (gen + [f"--batch={root / 'batch6.jsonl'}", f"--out={out}", "--batch_size=2"],),
    })
    code, _, err = results["train --help | head"]
    assert code == 0 and err == "", err  # no BrokenPipeError, not even the "Exception ignored" one at exit
    code, _, err = results["unreadable image"]
    assert code == 1 and "bad.png: cannot read image" in _one_error_line(err), err
    code, _, err = results["debug"]
    assert code == 1 and "Traceback (most recent call last)" in err and "DecompressionBombError" in err, err
    assert err.strip().splitlines()[-1].startswith("error: ") and "decompression bomb" in err.splitlines()[-1]
    code, _, err = results["prepare usage"]
    assert code == 2 and "required: --florence2, --out" in _one_error_line(err), err
    # 6 requests, one unreadable image: 5 results + 1 error row, exit 3, no traceback
    code, stdout, err = results["batch of 6"]
    assert code == gen_mod.PARTIAL_EXIT == 3, err
    assert "Traceback" not in err and "error:" not in err and stdout == ""
    assert "generate: 5 done, 1 error, 0 skipped" in err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(6)]
    assert [("error" in r) for r in rows] == [i == BAD for i in range(6)]
    assert "bad.png: cannot read image" in rows[BAD]["error"] and rows[BAD]["line"] == BAD + 1
    assert all(isinstance(r["text"], str) for i, r in enumerate(rows) if i != BAD)
    assert not gen_mod.partial_path(out).exists()


# ---- in-process: --help everywhere, one error line, exit codes -----------------------------------------------


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(f"florenz_bench_{name[:-3]}", ROOT / "bench" / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


BENCH = sorted(p.name for p in (ROOT / "bench").glob("*.py"))


def test_help_everywhere(capsys, monkeypatch):
    mains = {"train": train_mod.main, "generate": gen_mod.main, "eval": eval_mod.main, "scaling": scaling.main,
             "prepare": prepare_mod.main}
    for name in BENCH:
        mains[f"bench/{name}"] = _bench_module(name).main
    assert len(BENCH) >= 9  # throughput, packing, bench_fusions, ... all of them
    for name, main in mains.items():
        monkeypatch.setattr(sys, "argv", [name, "--help"])  # the argparse mains read sys.argv
        try:
            code = main() if name.startswith("bench/") else main(["--help"])
        except SystemExit as exc:  # argparse's --help exits 0
            code = exc.code
        out = capsys.readouterr().out
        assert code == 0 and out.startswith("usage: "), (name, code, out[:200])


def test_errors_are_one_line_with_the_right_exit_code(tiny, capsys, monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    root, ckpt = tiny
    gen = [f"--ckpt={ckpt}", "--max_new_tokens=2", "--num_beams=2"]
    xm = root / "xm.jsonl"  # an eval set whose only image does not decode
    xm.write_text(json.dumps({"image/key": "k", "en": {"caption": ["a cat"]}}) + "\n")
    (root / "xmimg").mkdir(exist_ok=True)
    (root / "xmimg" / "k.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    ev = [f"--ckpt={ckpt}", f"--out={root / 'r'}"]
    g, e, t, p = gen_mod.main, eval_mod.main, train_mod.main, prepare_mod.main
    cases = {  # name: (main, argv), expected exit status, text the one error line must hold
        "generate unknown key": (g, gen + ["--image=x.png", "--no_such=1"], 2, "'no_such'"),
        "generate missing image": (g, gen + [f"--image={root / 'missing.png'}"], 2, "missing.png"),
        "generate unreadable": (g, gen + [f"--image={root / 'bad.png'}"], 1, "bad.png: cannot read image"),
        "generate bomb": (g, gen + [f"--image={root / 'bomb.png'}"], 1, "bomb.png: refused as a possible decompress"),
        "generate bomb warning": (g, gen + [f"--image={root / 'bomb_warn.png'}"], 1, "bomb_warn.png: refused"),
        "generate missing ckpt": (g, [f"--ckpt={root / 'nope'}", f"--image={root / '0.png'}"], 2, "nope"),
        "generate foreign out": (g, gen + [f"--batch={root / 'batch6.jsonl'}", f"--out={root / 'batch6.jsonl'}"],
                                 2, "batch6.jsonl:1: not a generate result row"),
        "eval missing ckpt": (e, [f"--ckpt={root / 'nope'}", f"--out={root / 'r'}"], 2, "nope"),
        "eval set needs images": (e, ev + [f"--xm3600={xm}"], 2, "--xm3600 needs --xm3600-images"),
        "eval unreadable image": (e, ev + [f"--xm3600={xm}", f"--xm3600_images={root / 'xmimg'}",
                                           "--xm3600_langs=en", "--max_new_tokens=2", "--num_beams=1"], 1,
                                  "k.jpg: cannot read image"),
        "train bad value": (t, ["--steps=abc"], 2, "'abc'"),
        "train run-time failure": (t, ["--steps=1", f"--init={root / 'no_init'}", f"--out={root / 'run'}"], 1,
                                   "no_init"),
        "prepare missing option": (p, ["--preset", "tiny"], 2, "--florence2, --out"),
        "prepare missing path": (p, ["--preset", "tiny", "--florence2", str(root / "no_f2"), "--gemma2", str(root),
                                     "--out", str(root / "o")], 2, "--florence2"),
        "prepare bad override": (p, ["--preset", "tiny", "--florence2", str(root), "--out", str(root / "o"),
                                     "decoder.nope=1"], 2, "unknown key 'nope'"),
        "prepare input the preset needs": (p, ["--preset", "tiny", "--florence2", str(root), "--out",
                                               str(root / "o")], 2, "pass --gemma2 DIR"),
    }
    for name, (main, argv, status, text) in cases.items():
        code = main(argv)
        err = capsys.readouterr().err
        assert code == status, (name, code, err[-3000:])
        line = _one_error_line(err)
        assert text in line, (name, line)
        assert ("--debug" in line) == (status == 1), (name, line)  # a run-time failure says how to see more
    assert not (root / "o").exists() and not (root / "r").exists()
    monkeypatch.setenv(cli.DEBUG_ENV, "1")  # the env variable shows the traceback as --debug does
    assert g(gen + [f"--image={root / 'bad.png'}"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith("error: ")


# ---- in-process: the error convention ------------------------------------------------------------------------


def test_guarded_maps_exceptions_to_exit_codes(capsys, monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)

    def raising(exc):
        def run():
            raise exc
        return run

    cases = [(cli.UsageError("bad --x"), 2, "error: bad --x"),
             (FileNotFoundError("data.jsonl: no such file"), 2, "error: data.jsonl: no such file"),
             (ValueError("img.png: cannot read image\n(two lines)"), 1, "error: img.png: cannot read image (two "
                                                                       "lines)"),
             (KeyError("unknown recipe 'x'"), 1, "error: unknown recipe 'x'"),
             (TypeError("bad operand"), 1, "error: TypeError: bad operand"),
             (RuntimeError(), 1, "error: RuntimeError"),
             (KeyboardInterrupt(), 130, "error: interrupted")]
    for exc, status, line in cases:
        assert cli.guarded(raising(exc)) == status
        err = capsys.readouterr().err
        assert err.strip().splitlines() == [line + (f" (--debug or {cli.DEBUG_ENV}=1 shows the traceback)"
                                                    if status == 1 else "")], (exc, err)
    assert cli.guarded(lambda: 5) == 5 and cli.guarded(lambda: {"report": 1}) == 0 and cli.guarded(lambda: True) == 0
    assert cli.guarded(raising(ValueError("boom")), debug=True) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1] == "error: boom"


def test_debug_flag_and_env(monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert cli.pop_debug(["--a=1", "--debug", "--b=2"]) == (True, ["--a=1", "--b=2"])
    assert cli.pop_debug(["--debug=false"]) == (False, [])
    assert cli.pop_debug(["--a=1"]) == (False, ["--a=1"])
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    assert cli.pop_debug(["--a=1"]) == (True, ["--a=1"])

    from dataclasses import dataclass

    @dataclass
    class WithDebug:
        debug: bool = False

    assert cli.pop_debug(["--debug"], WithDebug)[1] == ["--debug"]  # a command's own `debug` field is left alone


def test_help_mentions_debug_and_exit_codes(capsys):
    assert gen_mod.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--debug" in out and "FLORENZ_DEBUG=1" in out and "2 a usage error" in out


def test_images_refuse_decompression_bombs(tmp_path):
    for name, size in (("big.png", 20_000), ("warn.png", 10_000)):
        path = _png_header(tmp_path / name, size, size)
        with pytest.raises(ValueError, match=rf"{name}: refused as a possible decompression bomb"):
            load_image(path)
    saved = Image.MAX_IMAGE_PIXELS
    try:  # the limit is PIL's own: lower it and an ordinary image is refused too
        Image.MAX_IMAGE_PIXELS = 100
        Image.new("RGB", (40, 30), "red").save(tmp_path / "small.png")
        with pytest.raises(ValueError, match="small.png: refused"):
            load_image(tmp_path / "small.png")
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    assert load_image(tmp_path / "small.png").size == (40, 30)


# ---- in-process: batch mode -----------------------------------------------------------------------------------


def _gen(ckpt, batch, out, *extra):
    args = [f"--ckpt={ckpt}", f"--batch={batch}", "--batch_size=2", "--max_new_tokens=3", "--num_beams=2", *extra]
    return gen_mod.main(args + ([f"--out={out}"] if out is not None else []))


def test_killed_run_keeps_its_rows_and_a_rerun_resumes_to_the_same_file(tiny, tmp_path, capsys, monkeypatch):
    root, ckpt = tiny
    batch = root / "batch6.jsonl"
    clean = tmp_path / "clean.jsonl"
    assert _gen(ckpt, batch, clean) == 3
    assert "5 done, 1 error, 0 skipped" in capsys.readouterr().err
    original, calls = gen_mod.Pipeline.generate, []

    def killed_on_second_chunk(self, requests, prefix=False):
        calls.append([r.id for r in requests])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, requests, prefix=prefix)

    out = tmp_path / "resumed.jsonl"
    monkeypatch.setattr(gen_mod.Pipeline, "generate", killed_on_second_chunk)
    assert _gen(ckpt, batch, out) == 130
    err = capsys.readouterr().err
    assert "error: interrupted" in err and "stopped after 2 of 6 requests" in err
    assert not out.exists()
    kept = [json.loads(line) for line in gen_mod.partial_path(out).read_text().splitlines()]
    assert [r["id"] for r in kept] == ["r0", "r1"] and all("text" in r for r in kept)
    monkeypatch.setattr(gen_mod.Pipeline, "generate", original)
    assert _gen(ckpt, batch, out) == 3
    err = capsys.readouterr().err
    assert "resuming" in err and "2 of 6 requests already done, skipped" in err
    assert "4 done" not in err and "5 done, 1 error, 2 skipped" in err
    assert out.read_bytes() == clean.read_bytes()  # the same file as one clean run
    assert not gen_mod.partial_path(out).exists()
    # once more: the 5 results are skipped, the error row is retried (still failing), the file is unchanged
    assert _gen(ckpt, batch, out) == 3
    assert "5 of 6 requests already done" in capsys.readouterr().err
    assert out.read_bytes() == clean.read_bytes()


def test_a_fixed_image_is_retried_and_a_cut_partial_line_is_dropped(tiny, tmp_path, capsys):
    root, ckpt = tiny
    batch = tmp_path / "b.jsonl"
    batch.write_text("".join(json.dumps({"image": str(root / f"{i}.png"), "id": f"x{i}"}) + "\n" for i in range(3))
                     + json.dumps({"image": str(tmp_path / "later.png")}) + "\n")  # no id: keyed by its line (4)
    out = tmp_path / "o.jsonl"
    assert _gen(ckpt, batch, out) == 3
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[3]["id"] is None and rows[3]["line"] == 4 and "later.png: no such image file" in rows[3]["error"]
    capsys.readouterr()
    # a killed run's partial file whose last line was cut mid-write: that row is dropped and made again
    part = gen_mod.partial_path(out)
    part.write_text(out.read_text().splitlines()[0] + "\n" + out.read_text().splitlines()[1][:20])
    Image.new("RGB", (30, 30), "purple").save(tmp_path / "later.png")
    assert _gen(ckpt, batch, out) == 0
    err = capsys.readouterr().err
    assert "3 of 4 requests already done" in err and "4 done, 0 errors, 3 skipped" in err
    new = [json.loads(line) for line in out.read_text().splitlines()]
    assert new[:3] == rows[:3] and "text" in new[3] and new[3]["line"] == 4


def test_a_failing_request_is_an_error_row_and_stdout_streams_rows(tiny, tmp_path, capsys, monkeypatch):
    root, ckpt = tiny
    original = gen_mod.Pipeline.generate

    def fails_for_r1(self, requests, prefix=False):
        if any(r.id == "r1" for r in requests):
            raise RuntimeError("CUDA out of memory (simulated)")
        return original(self, requests, prefix=prefix)

    monkeypatch.setattr(gen_mod.Pipeline, "generate", fails_for_r1)
    batch = tmp_path / "b.jsonl"
    batch.write_text("".join(json.dumps({"image": str(root / f"{i}.png"), "id": f"r{i}"}) + "\n" for i in range(3)))
    assert _gen(ckpt, batch, None) == 3
    cap = capsys.readouterr()
    rows = [json.loads(line) for line in cap.out.splitlines()]
    assert [r["id"] for r in rows] == ["r0", "r1", "r2"]
    assert rows[1]["error"] == "CUDA out of memory (simulated)" and "text" in rows[0] and "text" in rows[2]
    assert "2 done, 1 error" in cap.err and "Traceback" not in cap.err


def test_batch_file_and_out_errors_are_usage_errors(tiny, tmp_path, capsys):
    root, ckpt = tiny
    dup = tmp_path / "dup.jsonl"
    dup.write_text("".join(json.dumps({"image": str(root / "0.png"), "id": "a"}) + "\n" for _ in range(2)))
    assert _gen(ckpt, dup, tmp_path / "o.jsonl") == 2
    assert _one_error_line(capsys.readouterr().err) == f"error: {dup}:2: id 'a' repeats line 1 (ids must be unique)"
    other = tmp_path / "other.jsonl"  # results of another batch under the same --out: never overwritten
    other.write_text(json.dumps({"id": "zz", "line": 1, "image": "q.png", "text": "x"}) + "\n")
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"image": str(root / "0.png"), "id": "a"}) + "\n")
    assert _gen(ckpt, one, other) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{other}:1: the row for id 'zz'" in line and "another batch" in line
    assert json.loads(other.read_text())["id"] == "zz"
