"""Tiny random Hugging Face models and a byte-level BPE tokenizer, made locally (no network), shared by the
interop tests. Weights are drawn with a large std so that logits differ by far more than the tolerances.

torch.compile is switched off: transformers' BitLinear decorates its quantisers and unpacking with it,
which costs ~40 s of C++ compilation per shape on the 2-core host; eager runs the same functions (their
outputs were identical on the tiny BitNet, docs/results.md)."""

from __future__ import annotations

import json
import os

import torch

torch._dynamo.config.disable = True

TEXT = (
    "def add(a, b):\n    return a + b\n\nclass Stack:\n    def push(self, x):\n        self.items.append(x)\n"
    "the cat sat on the mat. the dog sat on the log. 0 1 2 3 4 5 6 7 8 9 yes no true false\n"
)
SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in Llama's tokenizer


def save_tokenizer(path: str, vocab_size: int = 320) -> None:
    """A byte-level BPE tokenizer (every string round-trips) with Llama's special ids, saved to `path` as
    tokenizer.json + tokenizer_config.json."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)


def hf_config(kind: str, vocab_size: int = 320, **kw):
    """A tiny transformers config of `kind` (llama | llama_tied | mistral | mixtral | jetmoe)."""
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        initializer_range=0.3,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    common.update(kw)
    if kind == "llama":
        return transformers.LlamaConfig(rope_theta=50000.0, **common)
    if kind == "llama_tied":
        return transformers.LlamaConfig(tie_word_embeddings=True, **common)
    if kind == "mistral":
        return transformers.MistralConfig(sliding_window=None, rope_theta=1e6, **common)
    if kind == "mixtral":
        return transformers.MixtralConfig(
            sliding_window=None, num_local_experts=4, num_experts_per_tok=2, rope_theta=1e6, **common
        )
    if kind == "bitnet":  # BitNet b1.58 2B4T's layout: ReLU^2 FFN, sub-norms; every output size % 4 == 0
        return transformers.BitNetConfig(
            rope_parameters={"rope_type": "default", "rope_theta": 20000.0}, **common
        )
    if kind == "jetmoe":  # one query head per KV head in each attention expert; block norms' eps 1e-6
        for k in ("num_attention_heads", "max_position_embeddings"):
            common.pop(k)
        common.update(rms_norm_eps=1e-6, num_key_value_heads=4, tie_word_embeddings=False)
        return transformers.JetMoeConfig(
            kv_channels=8, num_local_experts=4, num_experts_per_tok=2, rope_theta=20000.0, **common
        )
    raise ValueError(kind)


def make_hf_model(kind: str, path: str, seed: int = 0):
    """A random tiny HF causal LM of `kind` saved (safetensors, config, tokenizer) to `path`; returns it."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cls = {
        "llama": transformers.LlamaForCausalLM,
        "llama_tied": transformers.LlamaForCausalLM,
        "mistral": transformers.MistralForCausalLM,
        "mixtral": transformers.MixtralForCausalLM,
        "jetmoe": transformers.JetMoeForCausalLM,
    }[kind]
    model = cls(hf_config(kind)).eval()
    with torch.no_grad():  # RMSNorm gains away from 1, so a swapped norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith(".bias"):  # JetMoE's MoE/MoA output biases (voltron_jax has none)
                p.zero_()
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    save_tokenizer(path)
    return model


def make_hf_bitnet(path: str, seed: int = 0):
    """A random tiny BitNetForCausalLM quantised and packed as microsoft/bitnet-b1.58-2B-4T ships (each
    projection's ternary weights by transformers' `pack_weights`, weight_scale = 1 / mean|W|,
    quantization_config bitnet / bitlinear / offline), saved to `path`; returns it reloaded by
    AutoModelForCausalLM (transformers' own BitLinear forward)."""
    import transformers
    from safetensors.torch import save_file
    from transformers.integrations.bitnet import pack_weights

    torch.manual_seed(seed)
    config = hf_config("bitnet")
    model = transformers.BitNetForCausalLM(config).eval()
    tensors = {}
    for name, p in model.state_dict().items():
        if name.endswith("norm.weight"):  # gains away from 1, so a swapped norm would show
            p = 1.0 + 0.3 * torch.randn_like(p)
        if name.endswith("_proj.weight"):  # transformers' WeightQuant, then its packer
            scale = 1.0 / p.abs().mean().clamp(min=1e-5)
            tensors[name] = pack_weights((p * scale).round().clamp(-1, 1))
            tensors[name.replace(".weight", ".weight_scale")] = scale.reshape(1).float()
        else:
            tensors[name] = p.contiguous()
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    cfg = dict(config.to_dict(), architectures=["BitNetForCausalLM"])
    cfg["quantization_config"] = {
        "quant_method": "bitnet",
        "linear_class": "bitlinear",
        "quantization_mode": "offline",
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    save_tokenizer(path)
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def hf_logits(model, ids):
    """transformers' fp32 logits [B,T,V] of ids [B,T] as numpy."""
    import numpy as np
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """n greedy ids after `prompt` (which includes BOS), never stopping at EOS."""
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None
        )
    return out[0, len(prompt) :].tolist()


def spm_training_texts() -> list[str]:
    """Python sources of a few standard-library modules (code, prose, digits): an SPM training sample."""
    import inspect
    import json as json_mod
    import string
    import textwrap

    return [inspect.getsource(mod) for mod in (json_mod.encoder, json_mod.decoder, string, textwrap)]


def train_spm(path: str, vocab_size: int = 600) -> str:
    """A SentencePiece model trained with the project's own settings (data/vocab.py) at `path`."""
    from voltron_jax.data import vocab

    return vocab.train_sentencepiece(spm_training_texts(), vocab_size, path)


def nfkc_spm(path: str) -> str:
    """A SentencePiece model (the project's settings) whose normaliser says NFKC: it cannot be written as an
    exact tokenizer.json, so an export refuses it."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(open(train_spm(path), "rb").read())
    proto.normalizer_spec.name = "nmt_nfkc"
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
    return path
