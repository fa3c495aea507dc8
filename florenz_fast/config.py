"""Typed model configuration with named presets (SPEC §1-§5).

`get_config("florenz-3.5b")` returns a fresh `FlorenzConfig`; `apply_overrides(cfg, ["decoder.layers=4"])`
is the one generic override layer used by every command line of the engine.

Numbers are those of the released checkpoints; the parameter counts they produce are checked against SPEC §1
and the released key list by tests/test_config.py.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


@dataclass
class VisionConfig:
    """DaViT vision tower plus the image-token pipeline (SPEC §2)."""

    dims: tuple[int, ...] = (128, 256, 512, 1024)
    heads: tuple[int, ...] = (4, 8, 16, 32)  # window-attention heads; channel-attention groups are equal
    depths: tuple[int, ...] = (1, 1, 9, 1)  # each unit = spatial-window block + channel block
    window: int = 12
    patch_size: tuple[int, ...] = (7, 3, 3, 3)
    patch_stride: tuple[int, ...] = (4, 2, 2, 2)
    patch_padding: tuple[int, ...] = (3, 1, 1, 1)
    patch_prenorm: tuple[bool, ...] = (False, True, True, True)  # stage 0 normalises after its conv
    mlp_ratio: float = 4.0
    drop_path: float = 0.1  # linear from 0 over all 2*sum(depths) sub-blocks
    projection_dim: int = 768  # = encoder width d_enc
    max_pos_embeddings: int = 50  # row and column tables of the 2D position embedding
    max_temporal_embeddings: int = 100


@dataclass
class EncoderConfig:
    """Florence-2 multimodal BART encoder (SPEC §3)."""

    d_model: int = 768
    layers: int = 6
    heads: int = 12
    ffn: int = 3072
    vocab_size: int = 51289
    max_positions: int = 1024  # the table holds max_positions + 2 rows (BART's offset of 2)
    dropout: float = 0.1  # attention, activation and hidden dropout when training
    layer_norm_eps: float = 1e-5
    pad_id: int = 1
    max_prompt_tokens: int = 128


@dataclass
class DecoderConfig:
    """Decoder: `gemma2` (SPEC §4, with gated cross-attention) or `bart` (SPEC §5)."""

    kind: Literal["gemma2", "bart"] = "gemma2"
    hidden: int = 2304
    layers: int = 26
    heads: int = 8
    kv_heads: int = 4
    head_dim: int = 256
    ffn: int = 9216
    vocab_size: int = 256000
    encoder_width: int = 1024  # input width of the cross-attention k/v projections
    # Gemma-2 only
    query_pre_attn_scalar: float = 256.0  # attention scale = query_pre_attn_scalar ** -0.5
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    attn_softcap: float = 50.0  # 0 = off
    sliding_window: int = 4096  # on even layer indices; 0 = off
    # both kinds
    final_softcap: float = 30.0  # logits = c * tanh(z / c); 0 = off
    # BART only
    max_positions: int = 1024
    dropout: float = 0.1
    layer_norm_eps: float = 1e-5
    max_label_tokens: int = 128


@dataclass
class FlorenzConfig:
    name: str = "custom"
    image_size: int = 768
    vision: VisionConfig = field(default_factory=VisionConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

    def validate(self) -> "FlorenzConfig":
        v, e, d = self.vision, self.encoder, self.decoder
        n = len(v.dims)
        for name in ("heads", "depths", "patch_size", "patch_stride", "patch_padding", "patch_prenorm"):
            if len(getattr(v, name)) != n:
                raise ValueError(f"vision.{name} has {len(getattr(v, name))} entries, vision.dims has {n}")
        for dim, h in zip(v.dims, v.heads):
            if dim % h:
                raise ValueError(f"vision dim {dim} is not divisible by its heads/groups {h}")
        if v.projection_dim != e.d_model:
            raise ValueError(f"vision.projection_dim {v.projection_dim} != encoder.d_model {e.d_model}")
        if e.d_model % e.heads:
            raise ValueError(f"encoder.d_model {e.d_model} is not divisible by encoder.heads {e.heads}")
        if d.kind not in ("gemma2", "bart"):
            raise ValueError(f"decoder.kind must be 'gemma2' or 'bart', got {d.kind!r}")
        if d.kind == "gemma2" and d.heads % d.kv_heads:
            raise ValueError(f"decoder.heads {d.heads} is not a multiple of decoder.kv_heads {d.kv_heads}")
        if d.kind == "bart" and d.hidden != d.heads * d.head_dim:
            raise ValueError(f"bart decoder: hidden {d.hidden} != heads {d.heads} * head_dim {d.head_dim}")
        if d.encoder_width != e.d_model:
            raise ValueError(f"decoder.encoder_width {d.encoder_width} != encoder.d_model {e.d_model}")
        stride = 1
        for s in v.patch_stride:
            stride *= s
        if self.image_size % stride or self.image_size // stride > v.max_pos_embeddings:
            raise ValueError(
                f"image_size {self.image_size} must be a multiple of {stride} and at most "
                f"{stride * v.max_pos_embeddings} (position tables of {v.max_pos_embeddings})"
            )
        return self

    @property
    def patch_stride_total(self) -> int:
        out = 1
        for s in self.vision.patch_stride:
            out *= s
        return out

    def num_image_tokens(self, image_size: int | None = None) -> int:
        side = (image_size or self.image_size) // self.patch_stride_total
        return side * side + 1  # + the mean token

    # ---- (de)serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> "FlorenzConfig":
        """Typed parse: every key and value type is checked (all errors at once, each naming its key path)
        before `validate()` runs the cross-field checks, so `{"decoder": {"layers": "three"}}` reports
        `decoder.layers: expected int, got str 'three'`, not a consequence of it."""
        errors: list[str] = []
        kwargs = _from_dict(cls, data, "", errors)
        if errors:
            raise ValueError(f"{source}: " + (errors[0] if len(errors) == 1 else
                                               f"{len(errors)} problems:\n  " + "\n  ".join(errors)))
        return cls(**kwargs).validate()

    @classmethod
    def from_released(cls, config_json: "dict[str, Any] | str | Path", *, image_size: int = 768,
                      decoder_vocab_size: int | None = None, source: str | None = None) -> "FlorenzConfig":
        """Our config for the official Florenz `config.json` (a dict, the file, or its directory).

        Both decoder kinds: `text_config.gemma_config` present = Gemma-2 decoder, absent = the BART decoder of
        `text_config`. The image size is not in config.json (florenz_fast.convert reads it off
        preprocessor_config.json). Errors name the file and the official key path; see released_config.py.
        """
        from .released_config import from_released

        return from_released(config_json, image_size=image_size, decoder_vocab_size=decoder_vocab_size,
                             source=source)

    def to_released(self) -> dict[str, Any]:
        """The official `config.json` for this config; ValueError naming any field it cannot express."""
        from .released_config import to_released

        return to_released(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "FlorenzConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such config file") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(data, source=str(path))


def describe(value: Any) -> str:
    """`str 'three'`: a value with its JSON-side type, for error messages (long values shortened)."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def check_type(value: Any, hint: Any, where: str, errors: list[str]) -> Any:
    """`value` (parsed JSON) as the annotation `hint` wants it, or None with one line added to `errors`.

    JSON has no tuples and writes 256.0 as 256, so lists become tuples and ints are accepted for floats; a bool
    is never an int here (JSON `true` for `layers` is a mistake, not 1).
    """
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            errors.append(f"{where}: expected a list, got {describe(value)}")
            return None
        (inner, *_) = typing.get_args(hint)
        n = len(errors)
        items = tuple(check_type(v, inner, f"{where}[{i}]", errors) for i, v in enumerate(value))
        return items if len(errors) == n else None
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices or not isinstance(value, str):
            errors.append(f"{where}: expected one of {choices}, got {describe(value)}")
            return None
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{where}: expected float, got {describe(value)}")
            return None
        return float(value)
    if hint in (int, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            errors.append(f"{where}: expected {hint.__name__}, got {describe(value)}")
            return None
        return value
    raise TypeError(f"{where}: no JSON reading for a field of type {hint}")  # a config class we did not expect


def _from_dict(cls, data: Any, path: str, errors: list[str]) -> dict[str, Any]:
    """Constructor kwargs of dataclass `cls` from `data`; problems go to `errors` as `path.key: message`."""
    if not isinstance(data, dict):
        errors.append(f"{path or 'top level'}: expected an object for {cls.__name__}, got {describe(data)}")
        return {}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        errors.append(f"{path or 'top level'}: unknown key(s) for {cls.__name__}: {unknown}")
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            continue
        hint, where = hints[key], f"{path}.{key}" if path else key
        if dataclasses.is_dataclass(hint):
            kwargs[key] = hint(**_from_dict(hint, value, where, errors))
        else:
            kwargs[key] = check_type(value, hint, where, errors)
    return kwargs


# ---- presets --------------------------------------------------------------------------------------

_DAVIT_BASE = dict(dims=(128, 256, 512, 1024), heads=(4, 8, 16, 32))
_DAVIT_LARGE = dict(dims=(256, 512, 1024, 2048), heads=(8, 16, 32, 64))
_ENC_BASE = dict(d_model=768, layers=6, heads=12, ffn=3072, max_positions=1024)
_ENC_LARGE = dict(d_model=1024, layers=12, heads=16, ffn=4096, max_positions=4096)
# The BART presets keep Florence-2's padded encoder vocabulary (51,328 rows); the Gemma presets 51,289.
_BART_ENC_VOCAB, _GEMMA_ENC_VOCAB = 51328, 51289
_GEMMA_VOCAB, _BART_DEC_VOCAB = 256000, 257024


def _bart_decoder(enc: dict) -> DecoderConfig:
    d = enc["d_model"]
    return DecoderConfig(
        kind="bart", hidden=d, layers=enc["layers"], heads=enc["heads"], kv_heads=enc["heads"],
        head_dim=d // enc["heads"], ffn=enc["ffn"], vocab_size=_BART_DEC_VOCAB, encoder_width=d,
        max_positions=enc["max_positions"], final_softcap=30.0,
    )


def _preset(name: str) -> FlorenzConfig:
    if name in ("florenz-0.4b", "florenz-1.0b"):  # Florence-2 base / large with the BART decoder
        davit, enc = (_DAVIT_BASE, _ENC_BASE) if name == "florenz-0.4b" else (_DAVIT_LARGE, _ENC_LARGE)
        return FlorenzConfig(
            name=name, image_size=768,
            vision=VisionConfig(**davit, projection_dim=enc["d_model"]),
            encoder=EncoderConfig(**enc, vocab_size=_BART_ENC_VOCAB),
            decoder=_bart_decoder(enc),
        )
    if name in ("florenz-3.5b", "florenz-11.2b"):
        gemma = (
            dict(hidden=2304, ffn=9216, layers=26, heads=8, kv_heads=4)
            if name == "florenz-3.5b"
            else dict(hidden=3584, ffn=14336, layers=42, heads=16, kv_heads=8)
        )
        return FlorenzConfig(
            name=name, image_size=768,
            vision=VisionConfig(**_DAVIT_LARGE, projection_dim=1024),
            encoder=EncoderConfig(**_ENC_LARGE, vocab_size=_GEMMA_ENC_VOCAB),
            decoder=DecoderConfig(kind="gemma2", head_dim=256, query_pre_attn_scalar=256.0,
                                  vocab_size=_GEMMA_VOCAB, encoder_width=1024, **gemma),
        )
    if name == "small":  # CPU benchmarks (SPEC §1)
        return FlorenzConfig(
            name=name, image_size=224,
            vision=VisionConfig(dims=(32, 64, 128, 256), heads=(1, 2, 4, 8), depths=(1, 1, 3, 1), window=12,
                                projection_dim=128),
            encoder=EncoderConfig(d_model=128, layers=2, heads=4, ffn=512, vocab_size=8192, max_positions=1024),
            decoder=DecoderConfig(kind="gemma2", hidden=256, layers=4, heads=4, kv_heads=2, head_dim=64,
                                  query_pre_attn_scalar=64.0, ffn=1024, vocab_size=8192, sliding_window=4096,
                                  encoder_width=128),
        )
    if name in ("tiny", "tiny-bart"):  # tests and `make train`: seconds on a CPU
        vision = VisionConfig(dims=(16, 32, 64, 128), heads=(1, 2, 4, 8), depths=(1, 1, 1, 1), window=4,
                              projection_dim=64)
        encoder = EncoderConfig(d_model=64, layers=2, heads=4, ffn=128, vocab_size=512, max_positions=256)
        if name == "tiny":
            decoder = DecoderConfig(kind="gemma2", hidden=64, layers=3, heads=4, kv_heads=2, head_dim=16,
                                    query_pre_attn_scalar=16.0, ffn=128, vocab_size=512, sliding_window=8,
                                    encoder_width=64)
        else:
            decoder = DecoderConfig(kind="bart", hidden=64, layers=2, heads=4, kv_heads=4, head_dim=16, ffn=128,
                                    vocab_size=512, encoder_width=64, max_positions=256)
        return FlorenzConfig(name=name, image_size=64, vision=vision, encoder=encoder, decoder=decoder)
    raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")


PRESETS = ("tiny", "tiny-bart", "small", "florenz-0.4b", "florenz-1.0b", "florenz-3.5b", "florenz-11.2b")
RELEASED = ("florenz-0.4b", "florenz-1.0b", "florenz-3.5b", "florenz-11.2b")


def get_config(name: str) -> FlorenzConfig:
    """A fresh, validated config for a named preset."""
    return _preset(name).validate()


# ---- the one generic override layer ---------------------------------------------------------------

def _coerce(text: str, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is tuple:
        (inner, *_) = typing.get_args(hint)
        items = [s for s in text.strip("()[] ").split(",") if s.strip()]
        return tuple(_coerce(s.strip(), inner, where) for s in items)
    if origin is Literal:
        if text not in typing.get_args(hint):
            raise ValueError(f"{where}: {text!r} is not one of {typing.get_args(hint)}")
        return text
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if text.lower() in ("none", "null"):
            return None
        return _coerce(text, args[0], where)
    if hint is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{where}: {text!r} is not a boolean")
    if hint in (int, float, str):
        try:
            return hint(text)
        except ValueError:
            raise ValueError(f"{where}: {text!r} is not a valid {hint.__name__}") from None
    raise ValueError(f"{where}: cannot set a field of type {hint}")


def field_hint(cls: type, path: str, where: str) -> Any:
    """The annotation of the dotted field `path` of the dataclass `cls`; ValueError naming the key if none."""
    parts = path.split(".")
    hint = cls
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(hint):
            raise ValueError(f"{where}: {'.'.join(parts[:i])} is not a section")
        hints = typing.get_type_hints(hint)
        if part not in hints:
            raise ValueError(
                f"{where}: unknown key {part!r} in {hint.__name__}; "
                f"known: {', '.join(f.name for f in dataclasses.fields(hint))}"
            )
        hint = hints[part]
    return hint


def apply_overrides(obj: Any, overrides: list[str]) -> Any:
    """Apply `key.sub=value` (a leading `--` is allowed) to a dataclass tree in place and return it.

    Types follow the field annotations; unknown keys raise ValueError naming the key and the choices.
    florenz_fast.cli puts a command line (other spellings, --help, `error:` lines) in front of this.
    """
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ValueError(f"override {item!r} is not of the form key=value")
        path, value = text.split("=", 1)
        hint = field_hint(type(obj), path, f"override {item!r}")
        *sections, last = path.split(".")
        target = obj
        for part in sections:
            target = getattr(target, part)
        setattr(target, last, _coerce(value, hint, f"override {item!r}"))
    if hasattr(obj, "validate"):
        obj.validate()
    return obj
