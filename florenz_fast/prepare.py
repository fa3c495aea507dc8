"""Build a Florenz initialisation from a Florence-2 and (for the Gemma presets) a Gemma-2 checkpoint (SPEC §4-5).

    python -m florenz_fast.prepare --preset florenz-3.5b --florence2 DIR --gemma2 DIR --out DIR
    python -m florenz_fast.prepare --preset florenz-0.4b --florence2 DIR \
        --encoder-tokenizer DIR --decoder-tokenizer DIR --out DIR

Gemma presets: vision tower, projector and encoder from Florence-2; the decoder from Gemma-2; cross-attention
q/k/v/o drawn from normal(0, 0.02) (seeded), gates 0 (so the model equals Gemma-2), and each layer's
post_encoder_attention_layernorm a copy of its post_attention_layernorm.
BART presets: everything from Florence-2, with the decoder embedding (tied lm_head) replaced by a table over the
Gemma vocabulary: row t is the mean of the Florence-2 embedding rows of the BART tokenisation of token t's text
("▁" read as a space). Gemma's <pad>/<eos>/<bos> take BART's <pad>/</s>/<s> rows; a token whose text BART
tokenises to nothing, and rows past the tokenizer's vocabulary, take the mean of all Florence-2 rows.
If the preset's encoder vocabulary is larger than the checkpoint's (51,328 vs 51,289 rows for the BART presets),
the new rows are the mean of the existing ones.
Extra arguments `key=value` override the preset (florenz_fast.config.apply_overrides).
Errors follow florenz_fast.cli: one `error:` line, exit 2 for a usage error (a missing or unknown option, a bad
override, an input the preset needs, a missing path), 1 for a failure while preparing; --debug (or
FLORENZ_DEBUG=1) prints the traceback.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

from . import cli
from .checkpoint import open_checkpoint
from .config import apply_overrides, get_config
from .convert import detect_florence2_layout, external_name, import_florence2, import_gemma2, rows_of, save_pretrained
from .florenz import Florenz
from .text import TextTokenizer, load_decoder_tokenizer, load_encoder_tokenizer

CROSS_INIT_STD = 0.02


def _rows(source, key_ours: str, layout: str) -> int:
    rows = rows_of(source, key_ours, layout)
    if rows is None:
        raise ValueError(f"{source.path}: no {key_ours} ({external_name(key_ours, layout)}) in this Florence-2 "
                         "checkpoint")
    return rows


def _pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    if rows < weight.shape[0]:
        raise ValueError(f"cannot shrink an embedding from {weight.shape[0]} to {rows} rows")
    extra = weight.mean(0, keepdim=True).expand(rows - weight.shape[0], -1)
    return torch.cat([weight, extra])


def remap_embedding(florence_rows: torch.Tensor, gemma_tok: TextTokenizer, bart_tok: TextTokenizer,
                    rows: int) -> torch.Tensor:
    """The BART presets' decoder table (SPEC §5): mean of Florence-2 rows of each Gemma token's BART pieces."""
    mean = florence_rows.mean(0)
    out = mean.expand(rows, -1).clone()
    n = min(rows, gemma_tok.vocab_size)
    texts = [(gemma_tok.backend.id_to_token(i) or "").replace("\u2581", " ") for i in range(n)]
    pieces = bart_tok.encode_batch(texts)
    ids = torch.tensor([j for p in pieces for j in p], dtype=torch.long)
    owner = torch.repeat_interleave(torch.arange(n), torch.tensor([len(p) for p in pieces], dtype=torch.long))
    sums = torch.zeros(n, florence_rows.shape[1], dtype=florence_rows.dtype).index_add_(0, owner, florence_rows[ids])
    counts = torch.bincount(owner, minlength=n)
    has = counts > 0
    out[:n][has] = sums[has] / counts[has, None].to(sums.dtype)
    for g_id, b_id in ((gemma_tok.pad_id, bart_tok.pad_id), (gemma_tok.eos_id, bart_tok.eos_id),
                       (gemma_tok.bos_id, bart_tok.bos_id)):
        out[g_id] = florence_rows[b_id]
    return out


def _init_cross_attention(model: Florenz, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for layer in model.decoder.layers:
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            w = getattr(layer.encoder_attn, proj).weight
            setattr(getattr(layer.encoder_attn, proj), "weight", torch.nn.Parameter(
                torch.randn(w.shape, generator=g, dtype=torch.float32) * CROSS_INIT_STD))
        layer.encoder_attn_gate = torch.nn.Parameter(torch.zeros(1))
        layer.post_encoder_attention_layernorm.weight = torch.nn.Parameter(
            layer.post_attention_layernorm.weight.detach().clone())


def check_inputs(cfg, *, gemma2=None, encoder_tokenizer=None, decoder_tokenizer=None) -> None:
    """The inputs the preset's decoder kind needs (ValueError naming the missing option)."""
    if cfg.decoder.kind == "gemma2" and gemma2 is None:
        raise ValueError(f"preset {cfg.name!r} has a Gemma-2 decoder: pass --gemma2 DIR")
    if cfg.decoder.kind == "bart" and (encoder_tokenizer is None or decoder_tokenizer is None):
        raise ValueError(f"preset {cfg.name!r} has a BART decoder: pass --encoder-tokenizer DIR (Florence-2's "
                         "BART tokenizer) and --decoder-tokenizer DIR (Gemma's) for the vocabulary remap")


def prepare(cfg, florence2: str | Path, *, gemma2=None, encoder_tokenizer=None, decoder_tokenizer=None,
            seed: int = 0, log=print) -> Florenz:
    check_inputs(cfg, gemma2=gemma2, encoder_tokenizer=encoder_tokenizer, decoder_tokenizer=decoder_tokenizer)
    source = open_checkpoint(florence2)
    layout = detect_florence2_layout(source)
    log(f"Florence-2 checkpoint {florence2}: {layout} layout, {len(source)} tensors")
    # Build with the checkpoint's vocabularies, import, then resize/remap to the preset's.
    load_cfg = copy.deepcopy(cfg)
    load_cfg.encoder.vocab_size = _rows(source, "encoder.embed_tokens.weight", layout)
    if cfg.decoder.kind == "bart":
        load_cfg.decoder.vocab_size = _rows(source, "decoder.embed_tokens.weight", layout)
    with torch.device("meta"):
        model = Florenz(load_cfg)
    import_florence2(model, source, with_decoder=cfg.decoder.kind == "bart")
    if cfg.decoder.kind == "gemma2":
        import_gemma2(model, gemma2)
        log(f"Gemma-2 checkpoint {gemma2}: decoder loaded")
        _init_cross_attention(model, seed)
        log(f"cross-attention: q/k/v/o ~ normal(0, {CROSS_INIT_STD}) (seed {seed}), gates 0, "
            "post-encoder norms copied from post-attention norms")
    else:
        table = remap_embedding(model.decoder.embed_tokens.weight.detach(), load_decoder_tokenizer(decoder_tokenizer),
                                load_encoder_tokenizer(encoder_tokenizer), cfg.decoder.vocab_size)
        model.decoder.embed_tokens = torch.nn.Embedding.from_pretrained(table, freeze=False)
        log(f"decoder vocabulary remapped: {load_cfg.decoder.vocab_size} Florence-2 rows -> {table.shape[0]} "
            "Gemma rows")
    if cfg.encoder.vocab_size != load_cfg.encoder.vocab_size:
        table = _pad_rows(model.encoder.embed_tokens.weight.detach(), cfg.encoder.vocab_size)
        model.encoder.embed_tokens = torch.nn.Embedding.from_pretrained(table, freeze=False)
        log(f"encoder vocabulary padded: {load_cfg.encoder.vocab_size} -> {cfg.encoder.vocab_size} rows")
    model.cfg = cfg
    still_meta = [n for n, t in model.state_dict().items() if t.is_meta]
    if still_meta:  # a rule above is missing: never write a checkpoint with uninitialised tensors
        raise RuntimeError(f"uninitialised tensors after prepare: {still_meta[:10]}")
    return model


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one `error:` line and exit 2 (cli.UsageError), not its usage block."""

    def error(self, message: str):
        raise cli.UsageError(message)


def _parser() -> argparse.ArgumentParser:
    paragraphs = __doc__.split("\n\n")
    parser = _Parser(prog="python -m florenz_fast.prepare", description=paragraphs[0],
                     epilog="\n\n".join(paragraphs[2:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True)
    parser.add_argument("--florence2", required=True, help="Florence-2 checkpoint (Microsoft or native layout)")
    parser.add_argument("--gemma2", help="Gemma-2 checkpoint directory (Gemma presets)")
    parser.add_argument("--encoder-tokenizer", help="Florence-2 BART tokenizer directory (BART presets)")
    parser.add_argument("--decoder-tokenizer", help="Gemma tokenizer directory (BART presets)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    debug, argv = cli.pop_debug(list(sys.argv[1:] if argv is None else argv))
    parser = _parser()
    if any(a in ("-h", "--help") for a in argv):
        return cli.print_help(parser.format_help().rstrip())

    def run() -> int:
        try:
            args, overrides = parser.parse_known_args(argv)
            cfg = apply_overrides(get_config(args.preset), overrides)
            check_inputs(cfg, gemma2=args.gemma2, encoder_tokenizer=args.encoder_tokenizer,
                         decoder_tokenizer=args.decoder_tokenizer)
            for option, path in (("--florence2", args.florence2), ("--gemma2", args.gemma2),
                                 ("--encoder-tokenizer", args.encoder_tokenizer),
                                 ("--decoder-tokenizer", args.decoder_tokenizer)):
                if path is not None and not Path(path).exists():
                    raise FileNotFoundError(f"{option} {path}: no such file or directory")
        except (ValueError, KeyError) as exc:
            raise cli.UsageError(cli.error_message(exc)) from exc
        model = prepare(cfg, args.florence2, gemma2=args.gemma2, encoder_tokenizer=args.encoder_tokenizer,
                        decoder_tokenizer=args.decoder_tokenizer, seed=args.seed)
        out = save_pretrained(model, args.out)
        print(f"wrote {out} ({cfg.name})")
        return 0

    return cli.guarded(run, debug=debug)


if __name__ == "__main__":
    sys.exit(main())
