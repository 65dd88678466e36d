"""Hugging Face checkpoints out: a voltron_jax model -> safetensors + config.json + tokenizer that
`transformers.AutoModelForCausalLM.from_pretrained` loads with no custom code.

    python -m voltron_jax.interop.export_hf --workdir=runs/demo --out=exported/demo     (export_hf.py)
    hf_export.export(params, config, "exported/demo")                                    (python)

Which transformers class (`architecture`):
    ffn 'mlp', attention 'mha'                     -> LlamaForCausalLM
    ffn 'moe', attention 'mha'                     -> MixtralForCausalLM
    ffn 'moe', attention 'moa' (JetMoE's MoA)      -> JetMoeForCausalLM
    linear 'bitlinear' with bitlinear.norm 'sub'   -> BitNetForCausalLM, packed (quantization_config
                                                      bitnet / bitlinear / offline)
The exported function is the project's (tests/interop/test_hf_export.py compares logits and greedy
generations), with two documented differences: an MoE/MoA trained with `impl='capacity'` ran with
token dropping, which transformers' Mixtral/JetMoE never do (the export is the dropless function, as the
project's `impl='dropless'` computes); and parameters are written in fp32 (the project's master weights).

MiniCPM scaling is folded into the weights, exactly: scale_emb into the embedding table, the residual
scale scale_depth / sqrt(L) into every attention output and FFN down projection, and the logit division
d_model / dim_model_base into the LM head; with tied embeddings only the residual scale folds.

BitNet: transformers' BitNetForCausalLM is the SubLN layout (attn_sub_norm before o_proj, ffn_sub_norm
before down_proj, no norm inside q/k/v/gate/up; ReLU^2 gated FFN in BitNet b1.58 2B4T), which the
project's BitLinear computes with model.bitlinear.norm='sub' (and model.mlp.activation='relu2' for
2B4T's FFN; 'silu' is written as hidden_act='silu'). Each projection is written as its deployed ternary
weights: W_int = RoundClip(W / beta, -1, 1), beta = max(mean|W|, eps), exactly the project's quantiser
(models/bitlinear.py), packed 4 per uint8 along the output axis as transformers' `pack_weights` does
(value + 1 in bits 2j..2j+1 of packed row i for output row j * out/4 + i), `weight` [out/4, in] uint8,
and `weight_scale` [1] = 1 / beta (transformers' BitLinear *divides* by weight_scale: y = (x_int .
W_int) / (s_x * weight_scale)), beta the exact mean|W| (float64 sum; the project's fp32 forward reduction
differs by ~1e-6 relative); the residual scale folds into o/down's weight_scale. Activations are
quantised the same way on both sides (per token, 127 / max(|x|, 1e-5), round half to even, clip to
[-128, 127]), so only float rounding outside the integer matmuls differs (docs/interop.md bounds it).
transformers needs every projection's output size divisible by 4 and `accelerate` installed to load it.

Refused with one ConfigError naming the field and the nearest exportable setting (`check_exportable`):
Infini memory, DenseFormer, Mixture-of-Depths, a BitLinear other than ternary 'sub' (a norm inside every
linear has no transformers BitNet equivalent), a BitNet with an MoE/MoA, head_dim * n_heads != d_model,
eps != 1e-5 or an output size not divisible by 4, MoA over a dense FFN, MoA with n_heads != n_kv_heads,
MoE/MoA with top_k=1 (Switch gate, which Mixtral/JetMoE renormalise to 1), JetMoE with differing MoE/MoA
expert counts or norm_eps != 1e-6 (JetMoE's block norms fix it).

Tokenizer: the run's vocabulary as tokenizer.json (+ tokenizer_config.json). 'byte': a byte-level BPE
without merges whose ids are seqio.ByteVocabulary's (PAD 0, EOS 1, UNK 2, byte b -> b + 3), with EOS
prepended to every encoded text as BOS (the document boundary the model saw before every document);
'tokenizers': the files of data.tokenizer_path, copied; 'sentencepiece': a Unigram tokenizer.json with the
same ids, EOS prepended as BOS (interop/spm_tokenizer.py; a model it cannot convert exactly is refused:
export with tokenizer=False / --notokenizer and use transformers' converters).

Key mapping: the inverse of hf_import.py's (its docstring), plus JetMoE's (layer i, prefix
model.layers.i.):
    self_attention.kv_proj.weight = concat(k.T, v.T)
    self_attention.experts.input_linear.weight[e] = q[e].T
    self_attention.experts.output_linear.weight[e] = o[e].T
    mlp.input_linear.weight[e] = concat(gate[e].T, up[e].T)
    mlp.output_linear.weight[e] = down[e].T
    {mlp,self_attention.experts}.router.layer.weight = router.T; {mlp,self_attention.experts}.bias = 0
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable

import numpy as np

from voltron_jax.data import vocab as vocab_lib
from voltron_jax.errors import ConfigError
from voltron_jax.interop import hf_bitnet, spm_tokenizer

JETMOE_BLOCK_EPS = 1e-6  # transformers' JetMoeRMSNorm default, used by every block norm


def architecture(m) -> str:
    """The transformers class that expresses model config `m` (after `check_exportable`)."""
    if m.linear == "bitlinear":
        return "BitNetForCausalLM"
    if m.attention == "moa":
        return "JetMoeForCausalLM"
    return "MixtralForCausalLM" if m.ffn == "moe" else "LlamaForCausalLM"


def check_exportable(m) -> None:
    """Raise ConfigError naming the field that transformers cannot express, and the nearest setting."""
    blockers = [
        ("memory", "none", "Infini-attention's compressive memory"),
        ("residual", "plain", "DenseFormer's depth-weighted averages"),
        ("routing", "none", "Mixture-of-Depths routing"),
    ]
    for field, ok, what in blockers:
        if m[field] != ok:
            raise ConfigError(
                f"model.{field}={m[field]!r}: {what} has no Hugging Face equivalent; the nearest "
                f"exportable model is model.{field}={ok!r} (train or fine-tune one with it)."
            )
    if m.ffn not in ("mlp", "moe") or m.attention not in ("mha", "moa"):
        raise ConfigError(f"model.ffn={m.ffn!r} / model.attention={m.attention!r} cannot be exported.")
    if m.linear == "bitlinear":
        hf_bitnet.check_bitnet(m)
    elif m.linear != "dense":
        raise ConfigError(
            f"model.linear={m.linear!r} cannot be exported; the nearest is model.linear='dense'."
        )
    if m.tie_embeddings and (m.scale_emb != 1.0 or m.dim_model_base > 0):
        field = "scale_emb" if m.scale_emb != 1.0 else "dim_model_base"
        raise ConfigError(
            f"model.{field}={m[field]!r} with tied embeddings cannot be folded into one table; the nearest "
            "exportable setting is model.tie_embeddings=False (or the neutral scale_emb=1, dim_model_base=0)."
        )
    for name in ("moe",) * (m.ffn == "moe") + ("moa",) * (m.attention == "moa"):
        if m[name].top_k == 1:
            raise ConfigError(
                f"model.{name}.top_k=1 gates with the router probability (Switch); Mixtral and JetMoE "
                "renormalise over the chosen experts; the nearest exportable setting is "
                f"model.{name}.top_k=2."
            )
    if m.attention == "moa":
        if m.ffn != "moe":
            raise ConfigError(
                "model.attention='moa' with model.ffn='mlp': JetMoE pairs MoA with an MoE FFN; the nearest "
                "exportable model is model.ffn='moe' (or attention='mha' for a Llama)."
            )
        if (m.moe.n_experts, m.moe.top_k) != (m.moa.n_experts, m.moa.top_k):
            raise ConfigError(
                f"JetMoE has one expert count and top_k for MoA and MoE; model.moa (n_experts="
                f"{m.moa.n_experts}, top_k={m.moa.top_k}) differs from model.moe ({m.moe.n_experts}, "
                f"{m.moe.top_k}): set model.moa.n_experts and model.moa.top_k to model.moe's."
            )
        if m.n_heads != m.n_kv_heads:
            raise ConfigError(
                f"model.n_heads={m.n_heads} != model.n_kv_heads={m.n_kv_heads}: a JetMoE attention expert "
                "has one query head per KV head; the nearest exportable setting is "
                "model.n_heads=model.n_kv_heads."
            )
        if m.norm_eps != JETMOE_BLOCK_EPS:
            raise ConfigError(
                f"model.norm_eps={m.norm_eps}: transformers' JetMoE block norms use eps={JETMOE_BLOCK_EPS}; "
                f"set model.norm_eps={JETMOE_BLOCK_EPS}."
            )


def _head_dim(m) -> int:
    return m.head_dim or m.d_model // m.n_heads


def hf_config(m, max_len: int, special: dict) -> dict:
    """config.json of model config `m` (special: bos/eos/pad token ids)."""
    arch = architecture(m)
    rope = {"rope_type": "default", "rope_theta": float(m.rope_theta)}
    common = dict(
        architectures=[arch],
        vocab_size=m.vocab_size,
        hidden_size=m.d_model,
        intermediate_size=m.d_ff,
        num_hidden_layers=m.n_layers,
        num_key_value_heads=m.n_kv_heads,
        max_position_embeddings=max_len,
        rms_norm_eps=float(m.norm_eps),
        rope_parameters=rope,
        tie_word_embeddings=bool(m.tie_embeddings),
        dtype="float32",
        **special,
    )
    if arch == "JetMoeForCausalLM":
        return dict(
            common,
            model_type="jetmoe",
            kv_channels=_head_dim(m),
            num_local_experts=m.moe.n_experts,
            num_experts_per_tok=m.moe.top_k,
            activation_function="silu",
        )
    out = dict(
        common,
        num_attention_heads=m.n_heads,
        head_dim=_head_dim(m),
        hidden_act="silu",
        attention_bias=False,
    )
    if arch == "BitNetForCausalLM":
        out.pop("head_dim")
        return dict(
            out,
            model_type="bitnet",
            hidden_act=m.mlp.activation,
            quantization_config=dict(hf_bitnet.BITNET_QUANTIZATION),
        )
    if arch == "MixtralForCausalLM":
        return dict(
            out,
            model_type="mixtral",
            num_local_experts=m.moe.n_experts,
            num_experts_per_tok=m.moe.top_k,
            sliding_window=None,
            router_jitter_noise=0.0,
        )
    return dict(out, model_type="llama", mlp_bias=False, hidden_act=m.mlp.activation)


def _layers(params: dict, n_layers: int) -> list[dict]:
    stack = params["stack"]
    if "blocks" in stack:  # scan_layers=True: one stacked layer_0
        return [{k: v for k, v in _index(stack["blocks"]["layer_0"], i).items()} for i in range(n_layers)]
    return [stack[f"block_{i}"]["layer_0"] for i in range(n_layers)]


def _index(tree, i: int):
    if isinstance(tree, dict):
        return {k: _index(v, i) for k, v in tree.items()}
    return np.asarray(tree)[i]


def to_tensors(params: dict, m) -> dict[str, np.ndarray]:
    """HF tensors (numpy, the checkpoint's saved names: fp32, BitNet's packed weights uint8) of project
    params for model config `m`."""
    check_exportable(m)
    a = lambda x: np.asarray(x, np.float32)
    rs = m.scale_depth / math.sqrt(m.n_layers) if m.scale_depth > 0 else 1.0
    arch = architecture(m)
    t = {"model.embed_tokens.weight": a(params["embed"]["embedding"]) * m.scale_emb}
    t["model.norm.weight"] = a(params["final_norm"]["scale"])
    if not m.tie_embeddings:
        width = m.d_model / m.dim_model_base if m.dim_model_base > 0 else 1.0
        t["lm_head.weight"] = a(params["lm_head"]["kernel"]).T / width
    for i, layer in enumerate(_layers(params, m.n_layers)):
        p = f"model.layers.{i}."
        at, ff = layer["attn"], layer["ffn"]
        t[p + "input_layernorm.weight"] = a(layer["attn_norm"]["scale"])
        t[p + "post_attention_layernorm.weight"] = a(layer["ffn_norm"]["scale"])
        if arch == "BitNetForCausalLM":
            t.update(hf_bitnet.layer_tensors(at, ff, p, rs, m))
            continue
        if arch == "JetMoeForCausalLM":
            q = p + "self_attention."
            t[q + "kv_proj.weight"] = np.concatenate([a(at["k"]["kernel"]).T, a(at["v"]["kernel"]).T])
            t[q + "experts.input_linear.weight"] = a(at["q"]["kernel"]).transpose(0, 2, 1)
            t[q + "experts.output_linear.weight"] = a(at["o"]["kernel"]).transpose(0, 2, 1) * rs
            t[q + "experts.router.layer.weight"] = a(at["router"]).T
            t[q + "experts.bias"] = np.zeros(m.d_model, np.float32)
            gate, up = a(ff["gate"]["kernel"]).transpose(0, 2, 1), a(ff["up"]["kernel"]).transpose(0, 2, 1)
            t[p + "mlp.input_linear.weight"] = np.concatenate([gate, up], axis=1)  # [E,2F,D]
            t[p + "mlp.output_linear.weight"] = a(ff["down"]["kernel"]).transpose(0, 2, 1) * rs
            t[p + "mlp.router.layer.weight"] = a(ff["router"]).T
            t[p + "mlp.bias"] = np.zeros(m.d_model, np.float32)
            continue
        for n in ("q", "k", "v", "o"):
            t[f"{p}self_attn.{n}_proj.weight"] = a(at[n]["kernel"]).T * (rs if n == "o" else 1.0)
        if arch == "LlamaForCausalLM":
            for n in ("gate", "up", "down"):
                t[f"{p}mlp.{n}_proj.weight"] = a(ff[n]["kernel"]).T * (rs if n == "down" else 1.0)
        else:
            t[p + "block_sparse_moe.gate.weight"] = a(ff["router"]).T
            for e in range(m.moe.n_experts):
                x = f"{p}block_sparse_moe.experts.{e}."
                t[x + "w1.weight"] = a(ff["gate"]["kernel"][e]).T
                t[x + "w3.weight"] = a(ff["up"]["kernel"][e]).T
                t[x + "w2.weight"] = a(ff["down"]["kernel"][e]).T * rs
    return t


# --------------------------------------------------------------------------------------------- tokenizer


def byte_tokenizer():
    """seqio.ByteVocabulary as a transformers fast tokenizer (ids identical; EOS prepended as BOS)."""
    import tokenizers  # lazy: optional [interop] package
    from tokenizers import decoders, models, pre_tokenizers, processors  # lazy: optional [interop] package
    from transformers import PreTrainedTokenizerFast  # lazy: optional [interop] package

    alphabet = _bytes_to_unicode()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{alphabet[b]: b + 3 for b in range(256)}}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (GPT-2's, which ByteLevel uses)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars, strict=True)}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


BOUNDARY_IDS = dict(bos_token_id=1, eos_token_id=1, pad_token_id=0)  # byte and SentencePiece: EOS as BOS


def tokenizer_writer(data_cfg) -> tuple[Callable[[str], None], dict]:
    """(write(out), config.json's bos/eos/pad token ids) of the run's vocabulary. Everything that can be
    refused (a SentencePiece model that does not convert exactly) is refused here, before any write."""
    if data_cfg.vocab == "byte":
        return byte_tokenizer().save_pretrained, dict(BOUNDARY_IDS)
    if data_cfg.vocab == "sentencepiece":
        tok = spm_tokenizer.from_model(vocab_lib.make_vocab(data_cfg).sp_model)
        return tok.save_pretrained, dict(BOUNDARY_IDS)
    if data_cfg.vocab == "tokenizers":
        v = vocab_lib.TokenizersVocabulary(data_cfg.tokenizer_path)
        src = os.path.dirname(v.path)

        def copy(out: str) -> None:
            for f in TOKENIZER_FILES:
                if os.path.exists(os.path.join(src, f)):
                    shutil.copyfile(os.path.join(src, f), os.path.join(out, f))

        return copy, dict(bos_token_id=v.bos_token_id, eos_token_id=v.hf_eos_id, pad_token_id=None)
    raise ConfigError(f"data.vocab={data_cfg.vocab!r} has no tokenizer.json form; export with --notokenizer.")


def write_tokenizer(data_cfg, out: str) -> dict:
    """The run's vocabulary written to `out`; returns config.json's bos/eos/pad token ids."""
    write, special = tokenizer_writer(data_cfg)
    write(out)
    return special


# --------------------------------------------------------------------------------------------- export


def check_out(out: str) -> None:
    """Refuse an output folder that exists and is not empty: never overwrite a user's files."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConfigError(
            f"--out={out} exists and is not empty; give a new or empty folder (nothing was written)."
        )


def export(params, config, out: str, tokenizer: bool = True) -> str:
    """Write project `params` of run `config` to `out` as a Hugging Face checkpoint; returns `out`."""
    from safetensors.numpy import save_file  # lazy: optional [interop] package

    m = config.model
    check_out(out)
    tensors = to_tensors(params, m)  # check_exportable first: a refused model writes nothing
    write_tok, special = tokenizer_writer(config.data) if tokenizer else (None, {})
    if not tokenizer and config.data.vocab in ("byte", "sentencepiece"):
        special = dict(BOUNDARY_IDS)
    os.makedirs(out, exist_ok=True)
    if write_tok is not None:
        write_tok(out)
    cfg = hf_config(m, config.data.seq_len, special)
    save_file(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()},
        os.path.join(out, "model.safetensors"),
        metadata={"format": "pt"},
    )
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    return out
