"""The official Florenz `config.json` (the published code's: Florence-2's config plus `text_config.gemma_config`)
to and from our `FlorenzConfig`.

The official file, as read here (Microsoft's Florence-2 key names; every size key is required, keys for which
SPEC fixes a value may be left out):

    model_type "florence2", projection_dim (= vision_config.projection_dim)
    vision_config   DaViT: dim_embed, num_heads, num_groups (= num_heads), depths, window_size, patch_size,
                    patch_stride, patch_padding, patch_prenorm, drop_path_rate, projection_dim,
                    image_pos_embed {type learned_abs_2d, max_pos_embeddings},
                    visual_temporal_embedding {type COSINE, max_temporal_embeddings}
    text_config     the BART encoder: d_model, encoder_layers, encoder_attention_heads, encoder_ffn_dim, vocab_size,
                    max_position_embeddings, dropout (= attention_dropout = activation_dropout), pad_token_id;
                    BART presets: decoder_layers, decoder_attention_heads, decoder_ffn_dim, decoder_vocab_size
                    (absent: the decoder table's rows as the checkpoint stores them, else vocab_size);
                    Gemma presets: gemma_config = a Gemma2Config (hidden_size, intermediate_size, num_hidden_layers,
                    num_attention_heads, num_key_value_heads, head_dim, vocab_size, query_pre_attn_scalar,
                    rms_norm_eps, rope_theta or rope_parameters, attn_logit_softcapping, final_logit_softcapping,
                    sliding_window, layer_types); the cross-attention reads the encoder width d_model.

Not in the file, because the published code fixes them (SPEC §3-§5): the BART layer-norm eps 1e-5, the BART
decoder's final logit softcap 30, the 128-token truncations; the image size lives in preprocessor_config.json.

A key that would change the architecture in a way this engine does not implement (another activation, pre-LN
BART, unequal dropouts, untied Gemma embeddings, ...) is an error naming the file and the key path. Keys of
bookkeeping, tokens and generation are ignored; any other key is ignored with one warning that lists them all.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

from .config import PRESETS, DecoderConfig, EncoderConfig, FlorenzConfig, VisionConfig, check_type, describe, get_config

_MISSING = object()
IntTuple, BoolTuple = tuple[int, ...], tuple[bool, ...]

# Keys that describe no architecture: transformers' PretrainedConfig bookkeeping, token ids (SPEC §6 fixes them),
# generation settings (florenz_fast.generate has its own, SPEC §9) and training switches.
_IGNORED = frozenset("""
    _name_or_path architectures auto_map transformers_version torch_dtype dtype is_encoder_decoder is_decoder
    output_attentions output_hidden_states return_dict chunk_size_feed_forward id2label label2id problem_type
    num_labels tokenizer_class prefix task_specific_params torchscript use_return_dict pruned_heads
    tie_encoder_decoder add_cross_attention cross_attention_hidden_size finetuning_task
    bos_token_id eos_token_id pad_token_id decoder_start_token_id forced_bos_token_id forced_eos_token_id
    sep_token_id image_token_id image_token_index ignore_index
    max_length min_length num_beams num_beam_groups no_repeat_ngram_size early_stopping do_sample temperature
    top_k top_p typical_p length_penalty repetition_penalty diversity_penalty encoder_no_repeat_ngram_size
    bad_words_ids begin_suppress_tokens suppress_tokens num_return_sequences output_scores
    return_dict_in_generate remove_invalid_values exponential_decay_length_penalty
    use_cache gradient_checkpointing enable_checkpoint init_std initializer_range classifier_dropout
    classif_dropout add_bias_logits add_final_layer_norm num_hidden_layers cache_implementation
    max_position_embeddings
""".split())


class _Section:
    """One object of the official file: typed reads that record which keys were used, errors that name the path."""

    def __init__(self, data: Any, path: str, source: str, errors: list[str]):
        self.path, self.source, self.errors = path, source, errors
        self.used: set[str] = set()
        self.children: list[_Section] = []
        if not isinstance(data, dict):
            errors.append(f"{path}: expected an object, got {describe(data)}")
            data = {}
        self.data = data

    def where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str, hint: Any, default: Any = _MISSING) -> Any:
        """The value of `key` as `hint` wants it; `default` when absent (no default: a 'missing key' error)."""
        self.used.add(key)
        if key not in self.data:
            if default is _MISSING:
                self.errors.append(f"{self.where(key)}: missing (this engine needs it to build the model)")
            return None if default is _MISSING else default
        return check_type(self.data[key], hint, self.where(key), self.errors)

    def expect(self, key: str, allowed: tuple, why: str) -> None:
        """`key`, when present, must hold one of `allowed` (the only values this engine implements)."""
        self.used.add(key)
        if key in self.data and self.data[key] not in allowed:
            self.errors.append(f"{self.where(key)}: {describe(self.data[key])} is not supported ({why}; "
                               f"this engine implements {' or '.join(map(repr, allowed))})")

    def section(self, key: str, required: bool = True) -> "_Section | None":
        self.used.add(key)
        if key not in self.data:
            if required:
                self.errors.append(f"{self.where(key)}: missing (this engine needs it to build the model)")
            return None
        child = _Section(self.data[key], self.where(key), self.source, self.errors)
        self.children.append(child)
        return child

    def unread(self) -> list[str]:
        out = [self.where(k) for k in self.data if k not in self.used and k not in _IGNORED]
        for child in self.children:
            out += child.unread()
        return out


def _read_source(config_json: Any, source: str | None) -> tuple[dict, str]:
    if isinstance(config_json, dict):
        return config_json, source or "released config"
    path = Path(config_json)
    if path.is_dir():
        path = path / "config.json"
    try:
        return json.loads(path.read_text()), str(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such config file") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def from_released(config_json: Any, *, image_size: int = 768, decoder_vocab_size: int | None = None,
                  source: str | None = None) -> FlorenzConfig:
    """FlorenzConfig for the official config.json (dict, file or directory); see the module docstring.

    decoder_vocab_size: the BART decoder table's rows when config.json has no `text_config.decoder_vocab_size`
    (florenz_fast.convert passes the checkpoint's). source: the name errors give a dict (a path names itself).
    The name is the matching preset's when the result equals one (image size aside), else "custom".
    """
    data, source = _read_source(config_json, source)
    errors: list[str] = []
    top = _Section(data, "", source, errors)
    top.expect("model_type", ("florence2",), "a Florence-2 composite config")
    top.used.add("vocab_size")  # Florence2Config's copy of text_config.vocab_size
    vis, txt = top.section("vision_config"), top.section("text_config")
    if errors:
        raise ValueError(f"{source}: " + "; ".join(errors))  # without both sections nothing else can be read
    vision = _read_vision(vis)
    encoder = _read_encoder(txt)
    gemma = txt.section("gemma_config", required=False)
    if gemma is not None:  # Florence2LanguageConfig still holds its BART decoder's sizes; the Gemma one replaces it
        txt.used.update(("decoder_layers", "decoder_attention_heads", "decoder_ffn_dim", "decoder_vocab_size"))
    decoder = _read_gemma(gemma, encoder) if gemma is not None else _read_bart(txt, encoder, decoder_vocab_size)
    if top.has("projection_dim"):
        proj = top.get("projection_dim", int)
        if proj is not None and proj != vision.projection_dim:
            errors.append(f"projection_dim {proj} != vision_config.projection_dim {vision.projection_dim}")
    if errors:
        raise ValueError(f"{source}: " + (errors[0] if len(errors) == 1 else
                                          f"{len(errors)} problems:\n  " + "\n  ".join(errors)))
    unread = top.unread()
    if unread:
        warnings.warn(f"{source}: keys this engine does not read (ignored): {unread}", stacklevel=3)
    cfg = FlorenzConfig(name="custom", image_size=image_size, vision=vision, encoder=encoder, decoder=decoder)
    try:
        cfg.validate()
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    cfg.name = _matching_preset(cfg)
    return cfg


def _read_vision(s: _Section) -> VisionConfig:
    d = VisionConfig()
    s.expect("model_type", ("davit",), "the DaViT vision tower")
    heads = s.get("num_heads", IntTuple)
    if s.has("num_groups") and s.get("num_groups", IntTuple) != heads:
        s.errors.append(f"{s.where('num_groups')}: {describe(s.data['num_groups'])} differs from num_heads "
                        f"{heads}; this engine uses one number for window heads and channel groups (SPEC §2)")
    pos = s.section("image_pos_embed", required=False)
    temporal = s.section("visual_temporal_embedding", required=False)
    if pos is not None:
        pos.expect("type", ("learned_abs_2d",), "the image position embedding")
    if temporal is not None:
        temporal.expect("type", ("COSINE",), "the temporal embedding")
    s.expect("image_feature_source", (["spatial_avg_pool", "temporal_avg_pool"],), "the image tokens")
    s.expect("qkv_bias", (True,), "DaViT attention")
    s.expect("activation_function", ("gelu",), "the DaViT MLP")
    return VisionConfig(
        dims=s.get("dim_embed", IntTuple), heads=heads, depths=s.get("depths", IntTuple),
        window=s.get("window_size", int, d.window), patch_size=s.get("patch_size", IntTuple, d.patch_size),
        patch_stride=s.get("patch_stride", IntTuple, d.patch_stride),
        patch_padding=s.get("patch_padding", IntTuple, d.patch_padding),
        patch_prenorm=s.get("patch_prenorm", BoolTuple, d.patch_prenorm),
        mlp_ratio=s.get("mlp_ratio", float, d.mlp_ratio), drop_path=s.get("drop_path_rate", float, d.drop_path),
        projection_dim=s.get("projection_dim", int),
        max_pos_embeddings=pos.get("max_pos_embeddings", int, d.max_pos_embeddings) if pos else d.max_pos_embeddings,
        max_temporal_embeddings=(temporal.get("max_temporal_embeddings", int, d.max_temporal_embeddings)
                                 if temporal else d.max_temporal_embeddings),
    )


def _one_dropout(s: _Section) -> float:
    dropout = s.get("dropout", float, EncoderConfig().dropout)
    for key in ("attention_dropout", "activation_dropout"):
        other = s.get(key, float, dropout)
        if other is not None and dropout is not None and other != dropout:
            s.errors.append(f"{s.where(key)}: {other} != {s.where('dropout')} {dropout}; this engine uses one "
                            "dropout for attention, activation and hidden states (SPEC §3)")
    return dropout


def _read_encoder(s: _Section) -> EncoderConfig:
    s.expect("model_type", ("florence2_language", "bart"), "the Florence-2 BART language model")
    s.expect("activation_function", ("gelu",), "exact GELU in the BART layers (SPEC §3)")
    s.expect("scale_embedding", (False,), "no embedding scaling (SPEC §3)")
    s.expect("normalize_before", (False,), "post-LN layers (SPEC §3)")
    for key in ("encoder_layerdrop", "decoder_layerdrop"):
        s.expect(key, (0, 0.0), "no layer drop")
    return EncoderConfig(
        d_model=s.get("d_model", int), layers=s.get("encoder_layers", int), heads=s.get("encoder_attention_heads", int),
        ffn=s.get("encoder_ffn_dim", int), vocab_size=s.get("vocab_size", int),
        max_positions=s.get("max_position_embeddings", int), dropout=_one_dropout(s),
        pad_id=s.get("pad_token_id", int, EncoderConfig().pad_id),
    )


def _read_bart(s: _Section, enc: EncoderConfig, rows: int | None) -> DecoderConfig:
    heads = s.get("decoder_attention_heads", int)
    d_model = enc.d_model
    if heads and d_model and d_model % heads:
        s.errors.append(f"{s.where('decoder_attention_heads')}: {heads} does not divide d_model {d_model}")
    vocab = s.get("decoder_vocab_size", int, rows if rows is not None else enc.vocab_size)
    return DecoderConfig(
        kind="bart", hidden=d_model, layers=s.get("decoder_layers", int), heads=heads, kv_heads=heads,
        head_dim=d_model // heads if heads and d_model else 0, ffn=s.get("decoder_ffn_dim", int), vocab_size=vocab,
        encoder_width=d_model, max_positions=enc.max_positions, dropout=enc.dropout,
        layer_norm_eps=enc.layer_norm_eps, final_softcap=30.0,  # fixed in the published code (SPEC §5)
    )


def _read_gemma(g: _Section, enc: EncoderConfig) -> DecoderConfig:
    d = DecoderConfig()
    g.expect("model_type", ("gemma2",), "the Gemma-2 decoder")
    for key in ("hidden_activation", "hidden_act"):
        g.expect(key, ("gelu_pytorch_tanh",), "the GeGLU MLP with tanh GELU (SPEC §4)")
    g.expect("attention_bias", (False,), "no biases (SPEC §4)")
    g.expect("attention_dropout", (0, 0.0), "no attention dropout in Gemma-2")
    g.expect("tie_word_embeddings", (True,), "lm_head tied to embed_tokens (SPEC §4)")
    g.expect("rope_scaling", (None,), "plain RoPE")
    g.expect("use_bidirectional_attention", (None, False), "causal self-attention")
    theta = g.get("rope_theta", float, d.rope_theta)
    rope = g.section("rope_parameters", required=False)
    if rope is not None:
        rope.expect("rope_type", ("default",), "plain RoPE")
        theta = rope.get("rope_theta", float, theta)
    layers = g.get("num_hidden_layers", int)
    g.used.add("sliding_window")
    window = 0 if g.has("sliding_window") and g.data["sliding_window"] is None else (
        g.get("sliding_window", int, d.sliding_window))  # null = no window, as in transformers
    if g.has("layer_types") and layers:
        want = ["sliding_attention" if i % 2 == 0 and window else "full_attention" for i in range(layers)]
        g.expect("layer_types", (want,), "the window on even layer indices only (SPEC §4)")

    def softcap(key: str, default: float) -> float:
        g.used.add(key)
        return 0.0 if key in g.data and g.data[key] is None else g.get(key, float, default)

    return DecoderConfig(
        kind="gemma2", hidden=g.get("hidden_size", int), layers=layers, heads=g.get("num_attention_heads", int),
        kv_heads=g.get("num_key_value_heads", int), head_dim=g.get("head_dim", int),
        ffn=g.get("intermediate_size", int), vocab_size=g.get("vocab_size", int),
        encoder_width=enc.d_model,  # cross-attention k/v read the encoder output (SPEC §4)
        query_pre_attn_scalar=g.get("query_pre_attn_scalar", float, d.query_pre_attn_scalar),
        rms_eps=g.get("rms_norm_eps", float, d.rms_eps), rope_theta=theta,
        attn_softcap=softcap("attn_logit_softcapping", d.attn_softcap), sliding_window=window,
        final_softcap=softcap("final_logit_softcapping", d.final_softcap),
    )


def _matching_preset(cfg: FlorenzConfig) -> str:
    for name in PRESETS:
        preset = get_config(name)
        preset.image_size = cfg.image_size
        if dataclasses.replace(cfg, name=name) == preset:
            return name
    return "custom"


# ---- ours -> official ---------------------------------------------------------------------------------

def to_released(cfg: FlorenzConfig) -> dict[str, Any]:
    """The official config.json for `cfg`. Raises ValueError naming every field of ours the file cannot hold
    (read back, it would come out different): e.g. a BART decoder width other than the encoder's."""
    v, e, d = cfg.vision, cfg.encoder, cfg.decoder
    text: dict[str, Any] = {
        "model_type": "florence2_language", "vocab_size": e.vocab_size, "d_model": e.d_model,
        "encoder_layers": e.layers, "encoder_attention_heads": e.heads, "encoder_ffn_dim": e.ffn,
        "max_position_embeddings": e.max_positions, "dropout": e.dropout, "attention_dropout": e.dropout,
        "activation_dropout": e.dropout, "activation_function": "gelu", "scale_embedding": False,
        "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0, "pad_token_id": e.pad_id, "bos_token_id": 0,
        "eos_token_id": 2, "decoder_start_token_id": 2, "is_encoder_decoder": True,
    }
    if d.kind == "bart":
        text.update(decoder_layers=d.layers, decoder_attention_heads=d.heads, decoder_ffn_dim=d.ffn,
                    decoder_vocab_size=d.vocab_size)
    else:
        text["gemma_config"] = {
            "model_type": "gemma2", "hidden_size": d.hidden, "intermediate_size": d.ffn,
            "num_hidden_layers": d.layers, "num_attention_heads": d.heads, "num_key_value_heads": d.kv_heads,
            "head_dim": d.head_dim, "vocab_size": d.vocab_size, "query_pre_attn_scalar": d.query_pre_attn_scalar,
            "rms_norm_eps": d.rms_eps, "rope_theta": d.rope_theta, "hidden_activation": "gelu_pytorch_tanh",
            "attn_logit_softcapping": d.attn_softcap or None, "final_logit_softcapping": d.final_softcap or None,
            "sliding_window": d.sliding_window or None, "attention_bias": False, "attention_dropout": 0.0,
            "tie_word_embeddings": True, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
        }
    out = {
        "model_type": "florence2", "architectures": ["Florence2ForConditionalGeneration"],
        "projection_dim": v.projection_dim, "vocab_size": e.vocab_size, "is_encoder_decoder": True,
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": e.pad_id, "ignore_index": -100,
        "vision_config": {
            "model_type": "davit", "dim_embed": list(v.dims), "num_heads": list(v.heads), "num_groups": list(v.heads),
            "depths": list(v.depths), "window_size": v.window, "patch_size": list(v.patch_size),
            "patch_stride": list(v.patch_stride), "patch_padding": list(v.patch_padding),
            "patch_prenorm": list(v.patch_prenorm), "mlp_ratio": v.mlp_ratio, "drop_path_rate": v.drop_path,
            "projection_dim": v.projection_dim,
            "image_pos_embed": {"type": "learned_abs_2d", "max_pos_embeddings": v.max_pos_embeddings},
            "visual_temporal_embedding": {"type": "COSINE", "max_temporal_embeddings": v.max_temporal_embeddings},
            "image_feature_source": ["spatial_avg_pool", "temporal_avg_pool"],
        },
        "text_config": text,
    }
    rows = d.vocab_size if d.kind == "bart" else None
    back = from_released(out, image_size=cfg.image_size, decoder_vocab_size=rows)
    lost = _differences(dataclasses.asdict(cfg), dataclasses.asdict(back), "")
    unused = _UNUSED_BY_KIND[d.kind]  # fields the other decoder kind reads: they change no weight or number here
    lost = [x for x in lost if not x.startswith("name ") and x.split(" ")[0] not in unused]
    if lost:
        raise ValueError(f"config {cfg.name!r} cannot be written as the official config.json, which fixes or "
                         f"shares these fields (ours -> what the file would hold): {', '.join(lost)}")
    return out


_UNUSED_BY_KIND = {
    "gemma2": {"decoder.max_positions", "decoder.dropout", "decoder.layer_norm_eps"},
    "bart": {"decoder.query_pre_attn_scalar", "decoder.rms_eps", "decoder.rope_theta", "decoder.attn_softcap",
             "decoder.sliding_window"},
}


def _differences(a: dict, b: dict, prefix: str) -> list[str]:
    out = []
    for key, value in a.items():
        if isinstance(value, dict):
            out += _differences(value, b[key], f"{prefix}{key}.")
        elif value != b[key]:
            out.append(f"{prefix}{key} {value!r} -> {b[key]!r}")
    return out
