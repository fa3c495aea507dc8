"""Batches for training: padded or packed collation, a greedy token-budget packer, and a resumable loader.

    loader = Loader(pipeline, mode="packed", n_image_tokens=cfg.num_image_tokens(),
                    max_encoder_tokens=4096, max_decoder_tokens=2048)
    for batch in loader:
        out = model(**batch.model_inputs())          # labels included: out.loss = mean over target tokens
        loss_sum_N, count_N = batch.per_sample_token_losses(out.logits)

Two layouts of the same samples (i = 1..N, P_i prompt ids, L_i labels, I image tokens per sample):
    padded  input_ids (N, max P_i) padded with the encoder pad 1, attention_mask (N, max P_i) bool;
            labels (N, max L_i) padded with -100, decoder_input_ids = shift_right(labels) (pad 0),
            decoder_attention_mask (N, max L_i) bool.
    packed  input_ids (1, sum P_i), labels and decoder_input_ids (1, sum L_i), each sample's decoder input
            shifted on its own (its segment starts with the start token 1, never with the previous sample's
            eos), prompt_cu_seqlens / decoder_cu_seqlens (N+1,) int32 cumulative P_i / L_i. The model puts
            each sample's I image tokens in front of its prompt segment, so the encoder row is
            [img_1 ; prompt_1 ; img_2 ; prompt_2 ; ...]: self-attention is block-diagonal per sample on
            both sides (causal in the decoder) and decoder segment i cross-attends only to encoder segment i.
Both give the same per-sample losses and gradients (tests/test_packing.py, 1e-5 in fp32).

Token accounting (Batch properties, Loader.efficiency()):
    real        encoder: sum (I + P_i); decoder: sum L_i (= target tokens, labels != -100)
    allocated   tokens in the tensors the model computes on: padded N * (I + max P_i) and N * max L_i;
                packed = real (no padding inside the row)
    efficiency  real / allocated: the share of encoder/decoder compute spent on real tokens
    fill        packed only: real / (batches * token budget), how full the greedy packer gets the budget;
                this is what a static-shape kernel padding each row up to the budget would see.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from .ops import cu_seqlens_from_lengths
from .text import ENCODER_SPECIALS, IGNORE_INDEX, shift_right

ENCODER_PAD_ID = ENCODER_SPECIALS["pad"][1]  # 1
DECODER_PAD_ID = 0
DECODER_START_ID = 1  # eos; SPEC §6


class Example(Protocol):
    """What collation reads from an example (florenz_fast.data.EncodedExample has these fields)."""

    pixels: torch.Tensor  # (3, S, S) float32, normalised
    prompt_ids: list[int]  # [<s>, ..., </s>]
    labels: list[int]  # [bos, ..., eos]
    key: str  # task-language, e.g. "caption-de"


# ------------------------------------------------------------------------------------------------ Batch

@dataclass
class Batch:
    pixel_values: torch.Tensor  # (N, 3, S, S)
    input_ids: torch.Tensor  # padded (N, P) | packed (1, sum P_i)
    decoder_input_ids: torch.Tensor  # padded (N, L) | packed (1, sum L_i) = shift_right(labels) per sample
    labels: torch.Tensor  # same shape as decoder_input_ids, -100 where ignored (padding)
    keys: list[str]  # per sample
    attention_mask: torch.Tensor | None = None  # padded mode, (N, P) bool
    decoder_attention_mask: torch.Tensor | None = None  # padded mode, (N, L) bool
    prompt_cu_seqlens: torch.Tensor | None = None  # packed mode, int32 (N+1,)
    decoder_cu_seqlens: torch.Tensor | None = None  # packed mode, int32 (N+1,)
    n_image_tokens: int = 0  # image tokens per sample, for the encoder token counts

    @property
    def packed(self) -> bool:
        return self.prompt_cu_seqlens is not None

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for `Florenz.forward(**batch.model_inputs())`, labels included."""
        out = dict(pixel_values=self.pixel_values, input_ids=self.input_ids,
                   decoder_input_ids=self.decoder_input_ids, labels=self.labels)
        if self.packed:
            out.update(prompt_cu_seqlens=self.prompt_cu_seqlens, decoder_cu_seqlens=self.decoder_cu_seqlens)
        else:
            out.update(attention_mask=self.attention_mask, decoder_attention_mask=self.decoder_attention_mask)
        return out

    def _map(self, fn) -> "Batch":
        changes = {f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **changes)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        # cu_seqlens move too: varlen GPU kernels want them on the device (the model reads them back with
        # .tolist() where it needs Python ints).
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """Page-locked copies, so that `.to("cuda", non_blocking=True)` overlaps with compute."""
        return self._map(lambda t: t.pin_memory())

    # ---- token accounting ----------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return self.pixel_values.shape[0]

    @property
    def prompt_lengths(self) -> list[int]:
        if self.packed:
            return (self.prompt_cu_seqlens[1:] - self.prompt_cu_seqlens[:-1]).tolist()
        return self.attention_mask.sum(1).tolist()

    @property
    def label_lengths(self) -> list[int]:
        if self.packed:
            return (self.decoder_cu_seqlens[1:] - self.decoder_cu_seqlens[:-1]).tolist()
        return self.decoder_attention_mask.sum(1).tolist()

    @property
    def num_target_tokens(self) -> int:
        """Tokens the loss is taken over (labels != -100)."""
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def num_prompt_tokens(self) -> int:
        return sum(self.prompt_lengths)

    @property
    def num_encoder_tokens(self) -> int:
        """Real encoder tokens: image tokens plus prompt ids of every sample."""
        return self.num_samples * self.n_image_tokens + self.num_prompt_tokens

    @property
    def num_decoder_tokens(self) -> int:
        """Real decoder positions (sum of label lengths)."""
        return sum(self.label_lengths)

    @property
    def allocated_encoder_tokens(self) -> int:
        """Encoder positions the model computes on, padding included."""
        return self.num_samples * self.n_image_tokens + self.input_ids.numel()

    @property
    def allocated_decoder_tokens(self) -> int:
        return self.decoder_input_ids.numel()

    # ---- losses per sample ---------------------------------------------------------------------------
    def sample_index(self) -> torch.Tensor:
        """(N_tokens,) int64: the sample each decoder position belongs to, in `labels.flatten()` order."""
        if self.packed:
            lengths = (self.decoder_cu_seqlens[1:] - self.decoder_cu_seqlens[:-1]).long()
            return torch.repeat_interleave(torch.arange(self.num_samples, device=lengths.device), lengths)
        N, L = self.labels.shape
        return torch.arange(N, device=self.labels.device).repeat_interleave(L)

    def per_sample_token_losses(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample: (sum of token cross-entropies (N,) float32, target token count (N,) int64).

        `logits` is the model's (N, L, V) or (1, T, V) output for this batch; the sums keep the autograd
        graph (sum / count is the per-sample mean loss). Identical in both layouts.
        """
        if logits.shape[:2] != self.labels.shape:
            raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(self.labels.shape)}")
        labels = self.labels.to(logits.device).flatten()
        tok = F.cross_entropy(logits.float().flatten(0, 1), labels, ignore_index=IGNORE_INDEX, reduction="none")
        return self.per_sample_sums(tok.view(self.labels.shape))

    def per_sample_sums(self, token_losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample: (sum of the given per-token losses (N,), target token count (N,) int64).

        `token_losses` (N, L) / (1, T), e.g. the model's `token_losses` (forward(labels=..., return_logits=False):
        the fused loss on the triton backend, no logits); keeps the autograd graph."""
        if token_losses.shape != self.labels.shape:
            raise ValueError(f"token losses {tuple(token_losses.shape)} do not match labels "
                             f"{tuple(self.labels.shape)}")
        tok = token_losses.flatten()
        labels = self.labels.to(tok.device).flatten()
        idx = self.sample_index().to(tok.device)
        sums = torch.zeros(self.num_samples, dtype=tok.dtype, device=tok.device).index_add(0, idx, tok)
        counts = torch.zeros(self.num_samples, dtype=torch.long, device=tok.device).index_add(
            0, idx, (labels != IGNORE_INDEX).long())
        return sums, counts

    def loss_by_key(self, logits: torch.Tensor) -> dict[str, tuple[float, int]]:
        """{task-language key: (sum of token losses, token count)} for logging; detached."""
        return self.group_by_key(*self.per_sample_token_losses(logits.detach()))

    def group_by_key(self, sums: torch.Tensor, counts: torch.Tensor) -> dict[str, tuple[float, int]]:
        """Per-sample (loss sum, token count), as from per_sample_token_losses, added up per key."""
        out: dict[str, tuple[float, int]] = {}
        for key, s, c in zip(self.keys, sums.tolist(), counts.tolist()):
            s0, c0 = out.get(key, (0.0, 0))
            out[key] = (s0 + s, c0 + c)
        return out


# -------------------------------------------------------------------------------------------- collation

def _check_examples(examples: Sequence[Example], n_image_tokens: int) -> None:
    if len(examples) == 0:
        raise ValueError("cannot collate an empty list of examples")
    if n_image_tokens < 0:
        raise ValueError(f"n_image_tokens must be >= 0, got {n_image_tokens}")
    shape = tuple(examples[0].pixels.shape)
    for i, ex in enumerate(examples):
        if tuple(ex.pixels.shape) != shape:
            raise ValueError(f"example {i} ({ex.key}) has pixels {tuple(ex.pixels.shape)}, example 0 {shape}")
        if len(ex.prompt_ids) == 0 or len(ex.labels) == 0:
            raise ValueError(f"example {i} ({ex.key}) has {len(ex.prompt_ids)} prompt ids and "
                             f"{len(ex.labels)} labels; both need at least one")


def collate_padded(examples: Sequence[Example], n_image_tokens: int) -> Batch:
    """Right-padded batch (N, max P_i) / (N, max L_i) with masks; see the module doc."""
    _check_examples(examples, n_image_tokens)
    N = len(examples)
    P = max(len(ex.prompt_ids) for ex in examples)
    L = max(len(ex.labels) for ex in examples)
    input_ids = torch.full((N, P), ENCODER_PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((N, P), dtype=torch.bool)
    labels = torch.full((N, L), IGNORE_INDEX, dtype=torch.long)
    decoder_attention_mask = torch.zeros((N, L), dtype=torch.bool)
    for i, ex in enumerate(examples):
        input_ids[i, :len(ex.prompt_ids)] = torch.as_tensor(ex.prompt_ids, dtype=torch.long)
        attention_mask[i, :len(ex.prompt_ids)] = True
        labels[i, :len(ex.labels)] = torch.as_tensor(ex.labels, dtype=torch.long)
        decoder_attention_mask[i, :len(ex.labels)] = True
    return Batch(
        pixel_values=torch.stack([ex.pixels for ex in examples]),
        input_ids=input_ids,
        decoder_input_ids=shift_right(labels, DECODER_START_ID, DECODER_PAD_ID),
        labels=labels,
        keys=[ex.key for ex in examples],
        attention_mask=attention_mask,
        decoder_attention_mask=decoder_attention_mask,
        n_image_tokens=n_image_tokens,
    )


def collate_packed(examples: Sequence[Example], n_image_tokens: int) -> Batch:
    """One packed row (1, sum P_i) / (1, sum L_i) with cu_seqlens; see the module doc."""
    _check_examples(examples, n_image_tokens)
    prompt = [torch.as_tensor(ex.prompt_ids, dtype=torch.long) for ex in examples]
    labels = [torch.as_tensor(ex.labels, dtype=torch.long) for ex in examples]
    # shift each sample on its own: segment i starts with the start token, not with sample i-1's last label
    dec_in = [shift_right(t, DECODER_START_ID, DECODER_PAD_ID) for t in labels]
    return Batch(
        pixel_values=torch.stack([ex.pixels for ex in examples]),
        input_ids=torch.cat(prompt)[None],
        decoder_input_ids=torch.cat(dec_in)[None],
        labels=torch.cat(labels)[None],
        keys=[ex.key for ex in examples],
        prompt_cu_seqlens=cu_seqlens_from_lengths([len(t) for t in prompt]),
        decoder_cu_seqlens=cu_seqlens_from_lengths([len(t) for t in labels]),
        n_image_tokens=n_image_tokens,
    )


def collate(examples: Sequence[Example], n_image_tokens: int, mode: str) -> Batch:
    if mode == "packed":
        return collate_packed(examples, n_image_tokens)
    if mode == "padded":
        return collate_padded(examples, n_image_tokens)
    raise ValueError(f"mode must be 'packed' or 'padded', got {mode!r}")


# ----------------------------------------------------------------------------------------------- Packer

class Packer:
    """Greedy, order-preserving packing under token budgets.

    A batch takes examples in arrival order until the next one would push the encoder tokens
    (sum of n_image_tokens + len(prompt_ids)) above `max_encoder_tokens`, the decoder tokens (sum of
    len(labels)) above `max_decoder_tokens`, or the sample count above `max_samples` (None: no cap); that
    example then starts the next batch. No reordering, so the sample order (and the task-language balance
    of the pipeline) is kept exactly. An example larger than a budget on its own is a ValueError naming the
    sizes (raise the budget or truncate harder; silently dropping it would skew the data).
    """

    def __init__(self, n_image_tokens: int, max_encoder_tokens: int, max_decoder_tokens: int,
                 max_samples: int | None = None):
        if n_image_tokens < 0:
            raise ValueError(f"n_image_tokens must be >= 0, got {n_image_tokens}")
        for name, v in (("max_encoder_tokens", max_encoder_tokens), ("max_decoder_tokens", max_decoder_tokens)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
        if max_encoder_tokens <= n_image_tokens:
            raise ValueError(f"max_encoder_tokens {max_encoder_tokens} leaves no room for a prompt after "
                             f"{n_image_tokens} image tokens")
        self.n_image_tokens = n_image_tokens
        self.max_encoder_tokens = max_encoder_tokens
        self.max_decoder_tokens = max_decoder_tokens
        self.max_samples = max_samples

    def sizes(self, ex: Example) -> tuple[int, int]:
        """(encoder tokens, decoder tokens) of one example."""
        return self.n_image_tokens + len(ex.prompt_ids), len(ex.labels)

    def check(self, ex: Example) -> tuple[int, int]:
        enc, dec = self.sizes(ex)
        if enc > self.max_encoder_tokens or dec > self.max_decoder_tokens:
            raise ValueError(
                f"example {ex.key!r} needs {enc} encoder tokens ({self.n_image_tokens} image + "
                f"{len(ex.prompt_ids)} prompt) and {dec} decoder tokens, over the budget of "
                f"max_encoder_tokens={self.max_encoder_tokens}, max_decoder_tokens={self.max_decoder_tokens}")
        return enc, dec

    def fits(self, used: tuple[int, int, int], ex: Example) -> bool:
        """Whether `ex` joins a batch already holding `used` = (encoder tokens, decoder tokens, samples)."""
        enc, dec = self.check(ex)
        e, d, n = used
        if self.max_samples is not None and n + 1 > self.max_samples:
            return False
        return e + enc <= self.max_encoder_tokens and d + dec <= self.max_decoder_tokens

    def full(self, used: tuple[int, int, int]) -> bool:
        """No example can join any more (the sample cap is reached): close without reading ahead."""
        return self.max_samples is not None and used[2] >= self.max_samples

    def pack(self, examples: Iterable[Example]) -> Iterator[list[Example]]:
        """Greedy batches of a (finite or infinite) stream; the last, partial batch is yielded too."""
        batch: list[Example] = []
        used = (0, 0, 0)
        for ex in examples:
            if batch and not self.fits(used, ex):
                yield batch
                batch, used = [], (0, 0, 0)
            enc, dec = self.check(ex)
            batch.append(ex)
            used = (used[0] + enc, used[1] + dec, used[2] + 1)
        if batch:
            yield batch


# ----------------------------------------------------------------------------------------------- Loader

_STATE_FORMAT = "florenz-fast/loader-v1"


class _Counters:
    FIELDS = ("batches", "samples", "encoder_real", "encoder_allocated", "decoder_real", "decoder_allocated")

    def __init__(self):
        for f in self.FIELDS:
            setattr(self, f, 0)

    def add(self, batch: Batch) -> None:
        self.batches += 1
        self.samples += batch.num_samples
        self.encoder_real += batch.num_encoder_tokens
        self.encoder_allocated += batch.allocated_encoder_tokens
        self.decoder_real += batch.num_decoder_tokens
        self.decoder_allocated += batch.allocated_decoder_tokens

    def state(self) -> dict[str, int]:
        return {f: getattr(self, f) for f in self.FIELDS}

    def load(self, state: dict[str, int]) -> None:
        for f in self.FIELDS:
            setattr(self, f, int(state[f]))


class Loader:
    """DataPipeline -> Batches, packed or padded, sharded over ranks, exactly resumable.

    mode="packed": greedy `Packer` under max_encoder_tokens / max_decoder_tokens (and max_samples, None =
    no cap); mode="padded": `batch_size` examples per batch (the token budgets, if given, are ignored).

    Sharding: every rank draws the same global batch sequence from an identically seeded pipeline and rank
    r takes global batches r, r + world, r + 2*world, ... Each call to `next` builds one round of `world`
    global batches and collates only this rank's, so all ranks stay at the same round boundary and their
    states are identical. Simple and exact, at the price of every rank reading (decoding) every example:
    world x the data-loading work, which is small next to a training step on these models. With a finite
    pipeline the last partial batch is kept, but a round with fewer than `world` batches is dropped so all
    ranks stop after the same number of steps.

    Resume: `state_dict()` holds the pipeline's state before the first example of the next round (for an
    example that overflowed the previous batch, the state from before it was read), the global batch index
    and the efficiency counters; `load_state_dict()` on a fresh Loader over the same pipeline continues the
    identical batch sequence. The state is JSON-serialisable if the pipeline's is. Resuming with a
    different `world` continues the same global sequence (global batch g + r + k * world for rank r).
    The pipeline must continue from its loaded state when iterated (an iterator that is its own `__iter__`,
    or whose `__iter__` starts from its current state, like florenz_fast.data.DataPipeline), and its
    `state_dict()` must return a snapshot (a fresh copy): in packed mode the loader takes one before each
    example it reads into a non-empty batch, since that example may overflow and open the next round.
    """

    def __init__(self, pipeline, *, mode: str, n_image_tokens: int, max_encoder_tokens: int | None = None,
                 max_decoder_tokens: int | None = None, batch_size: int | None = None,
                 max_samples: int | None = None, rank: int = 0, world: int = 1):
        if mode not in ("packed", "padded"):
            raise ValueError(f"mode must be 'packed' or 'padded', got {mode!r}")
        if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
            raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
        if mode == "padded":
            if not isinstance(batch_size, int) or batch_size < 1:
                raise ValueError(f"padded mode needs batch_size >= 1, got {batch_size!r}")
            self.packer = None
        else:
            if max_encoder_tokens is None or max_decoder_tokens is None:
                raise ValueError("packed mode needs max_encoder_tokens and max_decoder_tokens")
            self.packer = Packer(n_image_tokens, max_encoder_tokens, max_decoder_tokens, max_samples)
        self.pipeline = pipeline
        self.mode, self.n_image_tokens = mode, n_image_tokens
        self.max_encoder_tokens, self.max_decoder_tokens = max_encoder_tokens, max_decoder_tokens
        self.batch_size, self.max_samples = batch_size, max_samples
        self.rank, self.world = rank, world
        self.next_global_batch = 0  # index of the first global batch of the next round
        self.stats = _Counters()  # over the batches this rank yielded
        self._it: Iterator | None = None
        self._pending: tuple[Any, Example] | None = None  # (pipeline state before it, example) overflow
        self._exhausted = False

    # ---- reading ------------------------------------------------------------------------------------
    def _read(self, snapshot: bool) -> tuple[Any, Example] | None:
        """Next example, with the pipeline state from before it was read if `snapshot` (else None)."""
        if self._pending is not None:
            item, self._pending = self._pending, None
            return item
        if self._exhausted:
            return None
        if self._it is None:
            self._it = iter(self.pipeline)
        state = self.pipeline.state_dict() if snapshot else None
        try:
            return state, next(self._it)
        except StopIteration:
            self._exhausted = True
            return None

    def _global_batch(self) -> list[Example] | None:
        first = self._read(snapshot=False)
        if first is None:
            return None
        examples = [first[1]]
        if self.packer is None:
            while len(examples) < self.batch_size:
                item = self._read(snapshot=False)
                if item is None:
                    break
                examples.append(item[1])
            return examples
        enc, dec = self.packer.check(first[1])
        used = (enc, dec, 1)
        while not self.packer.full(used):
            # the example read now may overflow and open the next round: keep the state from before it
            item = self._read(snapshot=True)
            if item is None:
                break
            if not self.packer.fits(used, item[1]):
                self._pending = item
                break
            enc, dec = self.packer.sizes(item[1])
            used = (used[0] + enc, used[1] + dec, used[2] + 1)
            examples.append(item[1])
        return examples

    # ---- iteration ----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        mine = None
        for r in range(self.world):
            examples = self._global_batch()
            if examples is None:  # finite pipeline ran out inside this round: drop the round on every rank
                raise StopIteration
            if r == self.rank:
                mine = examples
        self.next_global_batch += self.world
        batch = collate(mine, self.n_image_tokens, self.mode)
        self.stats.add(batch)
        return batch

    # ---- resume -------------------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        """What fixes the global batch sequence (besides the pipeline): must match on resume."""
        if self.mode == "packed":
            return dict(mode=self.mode, n_image_tokens=self.n_image_tokens, max_encoder_tokens=self.max_encoder_tokens,
                        max_decoder_tokens=self.max_decoder_tokens, max_samples=self.max_samples)
        return dict(mode=self.mode, n_image_tokens=self.n_image_tokens, batch_size=self.batch_size)

    def state_dict(self) -> dict[str, Any]:
        pipeline_state = self._pending[0] if self._pending is not None else self.pipeline.state_dict()
        return {"format": _STATE_FORMAT, "config": self._identity(), "next_global_batch": self.next_global_batch,
                "world": self.world, "pipeline": pipeline_state, "stats": self.stats.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"not a loader state (format {state.get('format')!r}, expected {_STATE_FORMAT!r})")
        if state["config"] != self._identity():
            raise ValueError(f"loader state was saved with {state['config']}, this loader is {self._identity()}: "
                             "the batch sequence would differ")
        self.pipeline.load_state_dict(state["pipeline"])
        self._it, self._pending, self._exhausted = None, None, False
        self.next_global_batch = int(state["next_global_batch"])
        self.stats.load(state["stats"])

    # ---- efficiency ---------------------------------------------------------------------------------
    def efficiency(self) -> dict[str, Any]:
        """Cumulative token accounting over the batches this rank yielded (definitions in the module doc)."""
        s = self.stats
        out: dict[str, Any] = {"mode": self.mode, "batches": s.batches, "samples": s.samples}
        for side, budget in (("encoder", self.max_encoder_tokens), ("decoder", self.max_decoder_tokens)):
            real, alloc = getattr(s, f"{side}_real"), getattr(s, f"{side}_allocated")
            d = {"real": real, "allocated": alloc, "efficiency": real / alloc if alloc else None}
            if self.mode == "packed":
                d["budget"] = s.batches * budget
                d["fill"] = real / d["budget"] if s.batches else None
            out[side] = d
        return out


class ListPipeline:
    """A finite list of examples as a resumable pipeline (what the Loader reads): evaluation sets, benchmarks, tests."""

    def __init__(self, examples):
        self.examples, self.index = examples, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.index >= len(self.examples):
            raise StopIteration
        self.index += 1
        return self.examples[self.index - 1]

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = state["index"]
