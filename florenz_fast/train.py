"""The training engine.

    python -m florenz_fast.train                                  # the `tiny` recipe: synthetic data, CPU, minutes
    python -m florenz_fast.train --recipe=cpt --preset=florenz-3.5b --init=prepared/ --data.path=train.jsonl
    torchrun --nproc_per_node=8 florenz_fast/train.py --recipe=cpt --parallel=fsdp ...
    python -m florenz_fast.train --help                           # the TrainConfig tree with its defaults

Overrides are `--key=value` on the TrainConfig tree below (`--optim.lr=3e-4`, `--data.mode=padded`,
`--model.decoder.layers=4`); `--recipe` and `--preset` are applied first, whatever their position.

One optimizer step = `grad_accum` micro-batches per rank. The loss is the mean cross-entropy over every target
token of the global step (all ranks, all micro-batches), so packed and padded batches, one process with
accumulation, DDP and FSDP2 all optimise the same quantity.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # started as a file (torchrun florenz_fast/train.py): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import florenz_fast  # noqa: F401

    __package__ = "florenz_fast"

import torch
from tqdm import tqdm

from . import cli
from .checkpoint import save_state_dict
from .config import FlorenzConfig, apply_overrides, get_config
from .convert import CONFIG_NAME, load_pretrained
from .distributed import World, all_reduce_sum, init_world, no_sync, wrap_model
from .florenz import Florenz, apply_trainable_policy, image_features_first
from .metrics import (
    NVML,
    MetricsWriter,
    device_peak_tflops,
    peak_memory_gib,
    plot_losses,
    sparkline,
    train_flops_per_sample,
)
from .train_state import (
    NonFiniteWeightsError,
    full_model_state_dict,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)


@dataclass
class OptimConfig:
    lr: float = 2e-3
    weight_decay: float = 0.0  # applied to matrices only; biases, norms and gates never decay
    betas: tuple[float, ...] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 20
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio at the last step
    grad_clip: float = 1.0  # 0 = off
    # auto (apex FusedAdam if importable on CUDA, else torch fused on CUDA and CPU / foreach) | apex | fused | foreach
    impl: str = "auto"


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | manifest | tar
    path: str = ""  # manifest JSONL, or comma-separated tar shards
    tokenizers: str = ""  # dir holding encoder/ and decoder/ tokenizer.json; synthetic: built into <out>/tokenizers
    synthetic_images: int = 512
    mode: str = "packed"  # packed | padded | static (packed with fixed shapes: one compiled graph, DESIGN.md 13)
    max_encoder_tokens: int = 768  # packed / static: image tokens + prompts per micro-batch
    max_decoder_tokens: int = 384  # packed / static: target tokens per micro-batch
    # static: the longest sample's segments (image tokens + prompt / labels), which become max_seqlen_k / q, so
    # kernels that pad each segment to max_seqlen (ops' `dense`) work on small blocks, not whole rows;
    # 0 = what the pipeline's truncation guarantees (image tokens + 128 / 128 tokens, SPEC §6), at most the row
    max_segment_encoder: int = 0
    max_segment_decoder: int = 0
    batch_size: int = 24  # padded: samples per micro-batch; packed: at most this many samples; static: image slots
    caption_prefix: bool = False
    # the grouping sampler: draw this many annotations of an image per visit, one after another, so they share a
    # batch and the frozen image path runs once for all of them (1 = SPEC §8, one per visit; docs/image-features.md)
    group_annotations: int = 1
    # a directory: the frozen image path's tokens per image on disk (features.py), filled before step 1 and read
    # instead of decoding and encoding the image; needs a frozen, deterministic image path (trainable spec or
    # no_vision, --model.vision.drop_path=0). "" = off
    feature_cache: str = ""


@dataclass
class TrainConfig:
    recipe: str = "tiny"
    preset: str = "tiny"
    model: FlorenzConfig = field(default_factory=lambda: get_config("tiny"))
    init: str = ""  # a florenz-fast checkpoint directory (e.g. from florenz_fast.prepare); "" = fresh weights
    # spec (SPEC §7: frozen vision tower, frozen Gemma body) | all (from-scratch runs) | no_vision (from scratch
    # with the vision tower and image-token pipeline frozen at their init, as Florenz freezes its pretrained ones)
    trainable: str = "spec"
    steps: int = 300
    stop_at: int = 0  # end this invocation after this step (a later run resumes); 0 = run to `steps`
    grad_accum: int = 1
    precision: str = "fp32"  # fp32 | bf16 (autocast, fp32 master weights) | fp16 (autocast + loss scaling)
    activation_checkpointing: str = "none"  # none | full | selective
    parallel: str = "auto"  # auto (ddp when several processes) | none | ddp | fsdp
    # torch.compile(fullgraph=True) of forward + loss (AOTAutograd compiles the backward with it); one graph per
    # micro-batch shape, so --data.mode=static gives one graph for the whole run
    compile: bool = False
    compile_backend: str = "inductor"  # inductor | aot_eager (tests: no C++ compile on the CPU) | eager
    # CUDA: the compiled step replayed as CUDA graphs (torch.compile mode="reduce-overhead": forward and backward
    # graphs captured, inputs copied into static buffers); needs --compile-able static batches
    cuda_graphs: bool = False
    device: str = "auto"
    seed: int = 0
    out: str = "runs/tiny"
    save_every: int = 100
    keep_checkpoints: int = 2
    max_bad_steps: int = 10  # stop after this many consecutive steps with a non-finite loss or gradients; 0 = never
    log_every: int = 10
    resume: bool = True  # continue from <out>/checkpoints/latest when there is one
    profile_steps: str = ""  # "START:END": torch.profiler trace of those steps into <out>/profile/
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


def recipe(name: str) -> TrainConfig:
    """`tiny` (default, CPU), and the paper's `cpt` / `finetune` (SPEC §8; pick the preset with --preset)."""
    if name == "tiny":  # from scratch, so everything trains (a frozen random decoder body would learn nothing)
        return TrainConfig(trainable="all")
    if name == "cpt":  # 224 px, AdamW 1e-4 / wd 0.01, cosine with 100 warm-up steps, fp16 as published
        return TrainConfig(
            recipe=name, preset="florenz-3.5b", model=_model_config("florenz-3.5b", 224), steps=2000,
            precision="fp16", activation_checkpointing="full", out="runs/cpt", save_every=250, log_every=10,
            data=DataConfig(source="manifest", mode="packed", max_encoder_tokens=16384, max_decoder_tokens=8192,
                            batch_size=256),
            optim=OptimConfig(lr=1e-4, weight_decay=0.01, warmup_steps=100),
        )
    if name == "finetune":  # 768 px, 5,000 steps, AdamW 5e-5 / wd 0.05
        return TrainConfig(
            recipe=name, preset="florenz-3.5b", model=_model_config("florenz-3.5b", 768), steps=5000,
            precision="bf16", activation_checkpointing="full", out="runs/finetune", save_every=500,
            data=DataConfig(source="manifest", mode="packed", max_encoder_tokens=32768, max_decoder_tokens=8192,
                            batch_size=64),
            optim=OptimConfig(lr=5e-5, weight_decay=0.05, warmup_steps=100),
        )
    raise KeyError(f"unknown recipe {name!r}; known: tiny, cpt, finetune")


def _model_config(preset: str, image_size: int) -> FlorenzConfig:
    cfg = get_config(preset)
    cfg.image_size = image_size
    return cfg.validate()


def parse_args(argv: list[str]) -> TrainConfig:
    """--recipe and --preset first (they replace whole sub-trees), then every other override in order."""
    first = {k: v for k, v in (a.lstrip("-").split("=", 1) for a in argv if "=" in a)
             if k in ("recipe", "preset")}
    cfg = recipe(first.get("recipe", "tiny"))
    if "preset" in first:
        cfg.preset = first["preset"]
        cfg.model = _model_config(first["preset"], cfg.model.image_size if cfg.recipe != "tiny" else
                                  get_config(first["preset"]).image_size)
    rest = [a for a in argv if a.lstrip("-").split("=", 1)[0] not in ("recipe", "preset")]
    apply_overrides(cfg, rest)
    cfg.model.validate()
    for name, value, allowed in (("precision", cfg.precision, ("fp32", "bf16", "fp16")),
                                 ("data.mode", cfg.data.mode, ("packed", "padded", "static")),
                                 ("data.source", cfg.data.source, ("synthetic", "manifest", "tar"))):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return cfg


# ---- pieces of the loop ---------------------------------------------------------------------------

def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    impl = cfg.impl
    if impl in ("auto", "apex") and device.type == "cuda":
        try:
            from apex.optimizers import FusedAdam  # optional peer; never required

            return FusedAdam(groups, adam_w_mode=True, **kwargs)
        except ImportError:
            if impl == "apex":
                raise
    if impl == "auto":
        # torch's fused AdamW on the CPU as well (torch >= 2.4): one kernel over all parameters, no .item() of the
        # step counts (foreach AdamW reads one per parameter tensor: 10 syncs per step on `tiny`), and the
        # non-finite skip stays on the device (_guarded_step)
        impl = "fused" if device.type in ("cuda", "cpu") else "foreach"
    return torch.optim.AdamW(groups, fused=impl == "fused", foreach=impl == "foreach", **kwargs)


def lr_lambda(cfg: OptimConfig, steps: int):
    def fn(step: int) -> float:  # step = optimizer steps taken so far
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return fn


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _build_data(cfg: TrainConfig, world: World, out: Path):
    from . import data as data_mod
    from .packing import InputLimits, Loader
    from .text import MAX_TEXT_LEN, load_decoder_tokenizer, load_encoder_tokenizer

    d = cfg.data
    if d.source == "synthetic":
        records = data_mod.synthetic_records(d.synthetic_images, cfg.seed, cfg.model.image_size)
        tok_dir = Path(d.tokenizers) if d.tokenizers else out / "tokenizers"
        if not d.tokenizers and world.main:
            data_mod.build_synthetic_tokenizers(tok_dir, records)
        if world.distributed:
            torch.distributed.barrier()
    else:
        if not d.path:
            raise ValueError(f"data.source={d.source} needs --data.path")
        if not d.tokenizers:
            raise ValueError(f"data.source={d.source} needs --data.tokenizers DIR (with encoder/ and decoder/)")
        tok_dir = Path(d.tokenizers)
        records = (data_mod.read_manifest(d.path) if d.source == "manifest"
                   else data_mod.read_tar_shards(d.path.split(",")))  # a stream: the pipeline keeps its counts
    enc_tok = load_encoder_tokenizer(tok_dir / "encoder")
    dec_tok = load_decoder_tokenizer(tok_dir / "decoder")
    for side, tok, vocab in (("encoder", enc_tok, cfg.model.encoder.vocab_size),
                             ("decoder", dec_tok, cfg.model.decoder.vocab_size)):
        if tok.vocab_size > vocab:
            raise ValueError(f"{tok_dir / side}: tokenizer has {tok.vocab_size} tokens, model.{side}.vocab_size "
                             f"is {vocab}")
    pipeline = data_mod.DataPipeline(records, enc_tok, dec_tok, cfg.model.image_size, seed=cfg.seed,
                                     caption_prefix=d.caption_prefix, group_size=d.group_annotations)
    n_img = cfg.model.num_image_tokens()
    segments = {}
    if d.mode == "static":
        segments = dict(
            max_segment_encoder=min(d.max_segment_encoder or n_img + MAX_TEXT_LEN, d.max_encoder_tokens + 1),
            max_segment_decoder=min(d.max_segment_decoder or MAX_TEXT_LEN, d.max_decoder_tokens + 1))
    loader = Loader(pipeline, mode=d.mode, n_image_tokens=n_img,
                    max_encoder_tokens=d.max_encoder_tokens, max_decoder_tokens=d.max_decoder_tokens,
                    batch_size=d.batch_size, max_samples=d.batch_size if d.mode in ("packed", "static") else None,
                    rank=world.rank, world=world.size, limits=InputLimits.from_config(cfg.model), **segments)
    return pipeline, loader, tok_dir


def attach_feature_cache(cfg: TrainConfig, model: Florenz, pipeline, world: World, autocast=None) -> dict | None:
    """--data.feature_cache=DIR: fill the cache with every image of the pipeline not in it yet (the main rank;
    the others wait, then read), then serve cached images as tokens. None when off."""
    if not cfg.data.feature_cache:
        return None
    from .features import FeatureCache

    cache = FeatureCache.for_model(model, cfg.data.feature_cache, cfg.model.image_size)
    counts = None
    if world.main:
        if not model.image_path_frozen():
            raise ValueError("data.feature_cache needs a frozen image path (trainable=spec or no_vision), "
                             f"got trainable={cfg.trainable}")
        counts = cache.fill(model, pipeline, autocast=autocast)  # refuses an active drop_path, naming the flag
        print(f"feature cache {cache.root}: {counts['cached']} images cached, {counts['computed']} computed, "
              f"{counts['unreadable']} unreadable")
    if world.distributed:
        torch.distributed.barrier()
    pipeline.features = cache
    return counts


def loop_forward_loss(module: torch.nn.Module):
    """The loop's eager forward and loss: `fn(inputs) -> (loss_sum, token_losses)`, without (B, L, V) logits; the
    sum carries the gradient, the per-token losses do not (the fused loss keeps the gradients its forward
    computed)."""
    def forward_loss(inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        out = module(**inputs, return_logits=False, sum_loss=True)
        return out.loss_sum, out.token_losses

    return forward_loss


def make_forward_loss(module: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    """`fn(inputs) -> (loss_sum, token_losses)`: forward and loss of one micro-batch; the loop backpropagates the
    sum and logs the per-token losses (without gradient: the fused loss keeps its forward's gradients).
    --compile: torch.compile'd with fullgraph=True (a graph break is an error, not a slow step); AOTAutograd
    compiles the backward of the same graph. --cuda_graphs (CUDA): mode="reduce-overhead", the forward and
    backward graphs replayed as CUDA graphs (the optimizer step stays outside: fused AdamW, no host read)."""
    forward_loss = loop_forward_loss(module)
    if cfg.cuda_graphs and device.type != "cuda":
        raise ValueError("cuda_graphs needs a CUDA device")
    if not (cfg.compile or cfg.cuda_graphs):
        return forward_loss
    mode = "reduce-overhead" if cfg.cuda_graphs else None
    compiled = torch.compile(forward_loss, fullgraph=True, dynamic=False, backend=cfg.compile_backend, mode=mode)
    model = getattr(module, "module", module)  # DDP wraps; FSDP2 shards in place (its tower then stays inside)
    if not isinstance(model, Florenz) or any(type(p).__name__ == "DTensor" for p in model.projector.parameters()):
        return compiled
    # the frozen image path (distinct images once) runs eagerly before the graph: fixed shapes, one graph
    return lambda inputs: compiled(image_features_first(model, inputs))


def export_final(model, cfg: TrainConfig, path: Path, world: World) -> Path | None:
    """The trained model in the foundation's format (config.json + safetensors); collective under FSDP2.
    Weights holding NaN or inf are refused (ValueError, nothing written); config.json travels with the shards,
    so a failed write leaves the previous export whole."""
    state = full_model_state_dict(model)
    if not world.main:
        return None
    save_state_dict(state, path, metadata={"writer": "florenz-fast", "preset": cfg.model.name}, require_finite=True,
                    extra_files={CONFIG_NAME: json.dumps(cfg.model.to_dict(), indent=2) + "\n"})
    return path


class TrainingDiverged(RuntimeError):
    """`max_bad_steps` consecutive steps had a non-finite loss or gradients; the message says what to do."""


def _grad_norm(params: list[torch.nn.Parameter], clip: float) -> torch.Tensor:
    """The global gradient norm (clipping to `clip` when > 0), a device tensor: its finiteness is the step's
    gradient check, so it is computed without clipping too (one foreach norm over the gradients)."""
    if clip:
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor (replicated), as a plain tensor
        norm = norm.full_tensor()
    return norm.float()


def _guarded_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, ok: torch.Tensor) -> torch.Tensor:
    """`optimizer.step()` only when `ok` (a device bool: the step's loss and gradient norm are finite); returns
    whether the update was applied, as a device bool that the loop reads with the step's other statistics.

    Where the host waits (DESIGN.md rule 13): nowhere, for torch's fused AdamW (the default on CUDA and CPU): the
    flag goes to the kernel as `found_inf`, the mechanism GradScaler uses, which leaves weights, moments and step
    count untouched. Other optimizers (foreach AdamW, apex) cannot skip on a device flag, so the flag
    is read once, between backward and the update: free on the CPU (no queue to drain), one wait on CUDA, the
    same read GradScaler makes for such optimizers in fp16. An update that has been applied cannot be undone
    without a copy of weights and moments (3x the parameter memory), so a read after the step is no option.
    fp16: GradScaler already skips on non-finite unscaled gradients; the loss check is folded into its found_inf,
    so it skips (and backs the scale off) for a non-finite loss too.
    """
    if scaler.is_enabled():
        found = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]  # filled by unscale_
        for flag in found.values():
            flag.copy_(torch.maximum(flag, (~ok).to(flag.device, flag.dtype).view_as(flag)))
        scaler.step(optimizer)
        return ok & (torch.stack([f.to(ok.device).reshape(()) for f in found.values()]).sum() == 0)
    if getattr(optimizer, "_step_supports_amp_scaling", False) and all(g.get("fused") for g in optimizer.param_groups):
        optimizer.grad_scale, optimizer.found_inf = None, (~ok).float()
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
        return ok
    if bool(ok):  # the one read, for optimizers without a device-side skip (see above)
        optimizer.step()
    return ok


def _apply_resumed_lr(cfg: TrainConfig, optimizer: torch.optim.Optimizer, scheduler, world: World) -> None:
    """A resumed run follows this run's --optim.lr: the scheduler's state carries the base rate it was built
    with (and the optimizer's, the rate of the next step), so without this a rerun with a lower rate after a
    divergence would silently diverge again at the old one."""
    old = scheduler.base_lrs[0]
    if old == cfg.optim.lr:
        return
    factor = lr_lambda(cfg.optim, cfg.steps)(scheduler.last_epoch)
    scheduler.base_lrs = [cfg.optim.lr] * len(optimizer.param_groups)
    for group in optimizer.param_groups:
        group["initial_lr"], group["lr"] = cfg.optim.lr, cfg.optim.lr * factor
    if world.main:
        print(f"resumed with optim.lr={cfg.optim.lr:g} (the checkpoint's run had {old:g})")


@dataclass
class _Health:
    """What the loop knows about divergence; saved in every checkpoint's train_state["health"].

    A checkpoint at step N holds the weights after update N, which are only known good once step N+1 has run
    them with a finite loss: it is `pending` until then, and `last_good` after (rotation never removes it)."""
    skipped: int = 0  # optimizer steps skipped (non-finite loss or gradients; fp16 overflow) in the whole run
    streak: int = 0  # consecutive bad steps now (a non-finite loss or gradients; fp16 overflow at loss scale <= 1)
    streak_start: int = 0  # the first step of the streak
    last_update: int = 0  # the last step whose update was applied
    last_update_lr: float = 0.0  # and its learning rate
    last_good: str | None = None  # newest checkpoint directory known good
    pending: str | None = None  # newest checkpoint, awaiting its confirmation by the next step

    def observe(self, step: int, loss_finite: bool, applied: bool, overflow_only: bool, lr: float = 0.0) -> None:
        """Step `step` ran (at learning rate `lr`): applied or skipped; `overflow_only`: skipped by fp16 loss
        scaling, not divergence."""
        if applied:
            self.last_update, self.last_update_lr = step, lr
        else:
            self.skipped += 1
        bad = not applied and not (loss_finite and overflow_only)
        if bad:
            self.streak += 1
            self.streak_start = self.streak_start if self.streak > 1 else step
            self.pending = None  # its weights gave a non-finite step
        elif applied:
            self.streak = 0
        if not bad and self.pending is not None:
            self.last_good, self.pending = self.pending, None

    def to_state(self, name: str) -> dict:
        """The record of a checkpoint named `name` written now (pending when the run is healthy)."""
        return {**dataclasses.asdict(self), "healthy": self.streak == 0,
                "pending": name if self.streak == 0 else None}

    @classmethod
    def from_state(cls, state: dict, name: str) -> _Health:
        h = state.get("health")
        if h is None:  # a checkpoint from before health was recorded: good, awaiting confirmation
            return cls(last_update=state["step"], pending=name)
        return cls(**{f.name: h[f.name] for f in dataclasses.fields(cls)})


def _divergence_message(cfg: TrainConfig, health: _Health, step: int, out: Path, scale: float | None) -> str:
    ckpts = out / "checkpoints"
    good = (f"last good checkpoint: {ckpts / health.last_good} (to continue from it: write {health.last_good} "
            f"into {ckpts / 'latest'}, then rerun with a lower --optim.lr)" if health.last_good else
            "no good checkpoint was written before it")
    cause = (f"a learning rate too high (optim.lr={cfg.optim.lr:g}; {health.last_update_lr:g} at step "
             f"{health.last_update}, the last update: lower it, or raise --optim.warmup_steps)")
    if cfg.precision == "fp16":
        cause = f"fp16 overflow (loss scale now {scale:g}; --precision=bf16 has the range of fp32) or {cause}"
    elif cfg.precision == "bf16":
        cause += ", or bf16 overflow"
    return (f"training diverged at step {step}: {health.streak} consecutive steps ({health.streak_start}-{step}) "
            f"with a non-finite loss or gradients, their updates skipped (weights as after step "
            f"{health.last_update}); {good}. Likely cause: {cause}")


# ---- the loop -------------------------------------------------------------------------------------

def train(cfg: TrainConfig) -> dict:
    world = init_world(cfg.device)
    out = Path(cfg.out)
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    # Subnormal floats make x86 CPUs ~10x slower once a run starts fitting (117 s vs 12 s measured on 150
    # tiny steps); flushing them to zero changes no reported digit.
    torch.set_flush_denormal(True)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    if cfg.init:
        model = load_pretrained(cfg.init, device=world.device, config=copy.deepcopy(cfg.model))
    else:
        model = Florenz(copy.deepcopy(cfg.model)).to(world.device)
    model.train()
    counts = apply_trainable_policy(model, cfg.trainable)
    pipeline, loader, tok_dir = _build_data(cfg, world, out)
    attach_feature_cache(cfg, model, pipeline, world, _autocast(cfg.precision, world.device))
    torch.manual_seed(cfg.seed + 1 + world.rank)  # dropout streams differ per rank
    train_module = wrap_model(model, world, parallel=cfg.parallel,
                              activation_checkpointing=cfg.activation_checkpointing)
    forward_loss = make_forward_loss(train_module, cfg, world.device)
    optimizer = build_optimizer(train_module, cfg.optim, world.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, cfg.steps))
    scaler = torch.amp.GradScaler(world.device.type, enabled=cfg.precision == "fp16")
    trainable = [p for p in train_module.parameters() if p.requires_grad]

    start = 0
    health = _Health()
    resumed_from = latest_checkpoint(out) if cfg.resume else None
    if resumed_from is not None:
        state = load_checkpoint(resumed_from, train_module, optimizer, world=world)
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        loader.load_state_dict(state["loader"])
        start = state["step"]
        health = _Health.from_state(state, resumed_from.name)
        _apply_resumed_lr(cfg, optimizer, scheduler, world)
    metrics = MetricsWriter(out / "metrics.jsonl", resume_step=start + 1 if resumed_from else None) \
        if world.main else None
    nvml = NVML(world.device)
    peak = device_peak_tflops(world.device)
    end = min(cfg.steps, cfg.stop_at) if cfg.stop_at else cfg.steps
    prof = _profiler(cfg, out, world)
    if world.main:
        print(f"florenz-fast train: recipe {cfg.recipe}, preset {cfg.model.name}, {counts['trainable']:,} trainable /"
              f" {counts['trainable'] + counts['frozen']:,} parameters, {world.size} process(es) on "
              f"{world.device}, {cfg.precision}, {cfg.data.mode} batches, steps {start}->{end} of {cfg.steps}"
              + (f", resumed from {resumed_from}" if resumed_from else ""))

    it = iter(loader)
    losses: list[float] = []
    diverged: str | None = None  # the error message once max_bad_steps bad steps in a row have been seen
    totals = {"tokens": 0.0, "samples": 0.0, "seconds": 0.0}
    bar = tqdm(range(start, end), desc="train", unit="step", disable=not world.main, initial=0)
    for step in bar:
        t0 = time.perf_counter()
        micro = [next(it) for _ in range(cfg.grad_accum)]
        # counted on the host, before the transfer (the CPU batches): no device->host read in the step
        local = [float(sum(b.num_target_tokens for b in micro)), float(sum(b.num_samples for b in micro)),
                 float(sum(b.num_encoder_tokens for b in micro))]
        n_tokens = all_reduce_sum(torch.tensor(local[0], device=world.device), world)
        loss_sum = torch.zeros((), device=world.device)
        per_sample = []  # (batch, loss sums, token counts) per micro-batch, read once after the step
        for i, batch in enumerate(micro):
            batch = batch.to(world.device, non_blocking=True)
            inputs = batch.model_inputs(host_layout=True)
            if cfg.cuda_graphs:  # a new replay: the previous micro-batch's graph outputs are consumed
                torch.compiler.cudagraph_mark_step_begin()
            with no_sync(train_module, i < len(micro) - 1), _autocast(cfg.precision, world.device):
                # per-token losses without (B, L, V) logits: the fused loss on the triton backend
                micro_sum, token_losses = forward_loss(inputs)
            sums, counts = batch.per_sample_sums(token_losses)  # per sample: loss sum, target tokens (no gradient)
            loss = micro_sum * world.size / n_tokens  # DDP / FSDP2 average gradients over ranks
            scaler.scale(loss).backward()
            loss_sum += micro_sum.detach()
            per_sample.append((batch, sums, counts))
        scaler.unscale_(optimizer)
        grad_norm = _grad_norm(trainable, cfg.optim.grad_clip).detach().to(world.device)
        # the global loss (summed over ranks before the update, so that every rank takes the same decision) and
        # the global gradient norm decide on device whether the update is applied: a non-finite one is skipped
        stats = all_reduce_sum(torch.cat([loss_sum.float().view(1), torch.tensor(local, device=world.device)]), world)
        applied = _guarded_step(optimizer, scaler, torch.isfinite(stats[0]) & torch.isfinite(grad_norm))
        step_lr = optimizer.param_groups[0]["lr"]  # the rate of this update (a host float: the scheduler's)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if prof is not None:
            prof.step()

        # after the step: one device->host copy of everything the log needs (the skip flag included)
        values = torch.cat([stats, (stats[0] / stats[1]).view(1), grad_norm.view(1), applied.float().view(1)]
                           + [t.float() for _, sums, counts in per_sample for t in (sums, counts)]).tolist()
        stats, step_loss, grad_norm, skipped, at = values[:4], values[4], values[5], values[6] == 0, 7
        by_key: dict[str, list[float]] = {}
        for b, sums, _ in per_sample:
            n = sums.numel()
            _add_by_key(by_key, b.group_by_key(values[at:at + n], [int(c) for c in values[at + n:at + 2 * n]]))
            at += 2 * n
        by_key = _merge_across_ranks(by_key, world)
        encoder_tokens = int(stats[3])
        losses.append(step_loss)
        if world.device.type == "cuda":
            torch.cuda.synchronize(world.device)
        seconds = time.perf_counter() - t0
        totals["tokens"] += stats[1]
        totals["samples"] += stats[2]
        totals["seconds"] += seconds
        bar.set_postfix(loss=f"{step_loss:.4f}")
        done = step + 1
        loss_scale = scaler.get_scale() if scaler.is_enabled() else None
        # fp16: a skip for gradient overflow with a finite loss is the scaler calibrating (it halves the scale),
        # not divergence, while the scale used was above 1 (at or below 1 the true gradients overflow fp16)
        overflow_only = loss_scale is not None and loss_scale / scaler.get_backoff_factor() > 1.0
        health.observe(done, math.isfinite(step_loss), not skipped, overflow_only, step_lr)
        if world.main:
            samples = stats[2]
            prompt_per_sample = encoder_tokens / max(samples, 1) - cfg.model.num_image_tokens()
            flops = train_flops_per_sample(model, cfg.model, prompt_per_sample, stats[1] / max(samples, 1)) \
                * samples
            record = {
                "step": done, "loss": step_loss, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                "loss_by_key": {k: s / c for k, (s, c) in sorted(by_key.items()) if c},
                "target_tokens": stats[1], "samples": samples, "step_seconds": seconds,
                "tokens_per_s": stats[1] / seconds, "samples_per_s": samples / seconds,
                "tflops_per_s": flops / seconds / 1e12,
                "mfu": (flops / seconds / 1e12 / peak / world.size) if peak else None,
                "peak_memory_gib": peak_memory_gib(world.device), "loss_scale": loss_scale,
                "skipped": skipped, "skipped_steps": health.skipped, **nvml.read(),
            }
            metrics.write(record)
            if done % cfg.log_every == 0 or done == end:
                tqdm.write(f"step {done:5d}  loss {step_loss:.4f}  lr {record['lr']:.2e}  "
                           f"{record['tokens_per_s']:,.0f} tok/s")
        if cfg.max_bad_steps and health.streak >= cfg.max_bad_steps:
            diverged = _divergence_message(cfg, health, done, out, loss_scale)
            end = done
            break
        if done % cfg.save_every == 0 or done == end:
            name = f"step-{done:06d}"
            try:
                save_checkpoint(out, done, train_module, optimizer, world=world, keep=cfg.keep_checkpoints,
                                train_state={"scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                                             "loader": loader.state_dict(), "config": dataclasses.asdict(cfg),
                                             "health": health.to_state(name)},
                                protect=[health.last_good] if health.last_good else [])
                if health.streak == 0:
                    health.pending = name
            except NonFiniteWeightsError as e:  # refused, nothing written; the run goes on (and stops if it diverged)
                if world.main:
                    tqdm.write(f"warning: {e}")
    bar.close()
    if prof is not None:
        prof.stop()

    summary = {"start_step": start, "end_step": end, "losses": losses, "out": str(out),
               "skipped_steps": health.skipped, "diverged": diverged}
    final = None
    if end == cfg.steps and not diverged:
        if health.streak:  # the weights gave non-finite losses: exporting them could replace a good final/
            if world.main:
                print(f"final export not written: the last {health.streak} step(s) had a non-finite loss or "
                      f"gradients", file=sys.stderr)
        else:
            try:
                final = export_final(train_module, cfg, out / "final", world)
            except ValueError as e:  # weights with NaN or inf: refused before anything was written
                print(f"final export refused: {e}", file=sys.stderr)
    if world.main:
        records = metrics.read()
        png = plot_losses(records, out / "loss.png") if records else None
        summary.update(final=str(final) if final else None, plot=str(png) if png else None,
                       data=pipeline.stats.report() if hasattr(pipeline, "stats") else "",
                       efficiency=loader.efficiency() if hasattr(loader, "efficiency") else {})
        _print_summary(cfg, summary, totals, out, tok_dir)
    if world.distributed:
        torch.distributed.destroy_process_group()
    if diverged:
        raise TrainingDiverged(diverged)
    return summary


def _merge_across_ranks(by_key: dict[str, list[float]], world: World) -> dict[str, list[float]]:
    if not world.distributed:
        return by_key
    gathered = [None] * world.size
    torch.distributed.all_gather_object(gathered, by_key)
    merged: dict[str, list[float]] = {}
    for part in gathered:
        _add_by_key(merged, part)
    return merged


def _add_by_key(into: dict[str, list[float]], part: dict) -> None:
    for key, (s, c) in part.items():
        acc = into.setdefault(key, [0.0, 0.0])
        acc[0] += s
        acc[1] += c


def _profiler(cfg: TrainConfig, out: Path, world: World):
    if not cfg.profile_steps:
        return None
    a, b = (int(x) for x in cfg.profile_steps.split(":"))
    acts = [torch.profiler.ProfilerActivity.CPU]
    if world.device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    trace_dir = out / "profile"
    trace_dir.mkdir(parents=True, exist_ok=True)

    def export(p):
        p.export_chrome_trace(str(trace_dir / f"trace-rank{world.rank}.json"))

    prof = torch.profiler.profile(activities=acts, on_trace_ready=export, record_shapes=True,
                                  schedule=torch.profiler.schedule(wait=max(0, a - 1), warmup=1, active=b - a))
    prof.start()
    return prof


def _print_summary(cfg: TrainConfig, summary: dict, totals: dict, out: Path, tok_dir: Path) -> None:
    losses = summary["losses"]
    if not losses:
        print("nothing to do: the run had already reached its last step")
        return
    secs = max(totals["seconds"], 1e-9)
    print(f"\nloss {losses[0]:.4f} -> {losses[-1]:.4f} over steps {summary['start_step'] + 1}-{summary['end_step']}"
          f"   {sparkline(losses)}")
    print(f"throughput: {totals['tokens'] / secs:,.0f} target tokens/s, {totals['samples'] / secs:,.1f} samples/s")
    if summary.get("skipped_steps"):
        print(f"skipped steps: {summary['skipped_steps']} (non-finite loss or gradients: the update was not applied;"
              f" `skipped` in metrics.jsonl)")
    if summary.get("efficiency"):
        eff = summary["efficiency"]
        parts = [f"{side} {eff[side]['efficiency']:.1%}" + (f" (budget filled {eff[side]['fill']:.1%})"
                                                             if eff[side].get("fill") is not None else "")
                 for side in ("encoder", "decoder") if eff.get(side, {}).get("efficiency") is not None]
        print(f"{eff['mode']} batches, real / computed tokens: " + ", ".join(parts))
    if summary.get("data"):
        print(summary["data"])
    print(f"where things went: metrics {out / 'metrics.jsonl'}, checkpoints {out / 'checkpoints'}, "
          f"tokenizers {tok_dir}" + (f", model {summary['final']}" if summary.get("final") else "")
          + (f", plot {summary['plot']}" if summary.get("plot") else ""))


def main(argv: list[str] | None = None) -> int:
    """`python -m florenz_fast.train --help` lists the TrainConfig tree (the `tiny` recipe's values).
    A diverged run or a failed checkpoint write: one `error: ...` line and exit status 1 (usage errors: 2), as
    for every run-time failure (cli.guarded)."""
    return cli.main(TrainConfig, train, argv, prog="python -m florenz_fast.train", description=__doc__,
                    build=parse_args, defaults=recipe("tiny"))


if __name__ == "__main__":
    sys.exit(main())
