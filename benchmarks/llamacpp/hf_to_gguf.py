#!/usr/bin/env python3
"""Convert a Llama-architecture Hugging Face directory (config.json + model.safetensors, as written by
`anyprec synth`) to a llama GGUF with llama.cpp's own gguf-py, without torch.

It does what llama.cpp's convert_hf_to_gguf.py (LlamaModel) does for this architecture:
- the same hparams keys (context, embedding, feed-forward, heads, kv heads, head dim, rope base and
  dimension, rms eps, vocab size, file type);
- the q/k rows permuted from Hugging Face's half-split RoPE order to GGML's interleaved order with
  LlamaModel.permute (copied below), so the GGUF computes the same function as the safetensors;
- 1-D tensors and norms kept in F32, matrices in the chosen type (F16 or F32);
- the SentencePiece vocabulary with its scores and token types (_create_vocab_sentencepiece), and
  bos/eos/unk ids from the tokenizer with add_bos=true, add_eos=false (Llama 2's tokenizer_config).

Tensors are streamed one at a time (header first, then data), so memory stays near one tensor.
Needs numpy and sentencepiece (Debian: python3-numpy python3-sentencepiece).
"""
import argparse
import json
import os
import struct
import sys
from pathlib import Path

import numpy as np


def permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: Hugging Face q/k rows -> GGML's interleaved RoPE pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Tensors of one .safetensors file as float32-convertible views over a memory map (BF16 widened on access)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    raw = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in raw:
            sys.exit(f"error: {path}: tensor {name} has dtype {info['dtype']}; only F32, F16 and BF16 are read")
        begin, end = info["data_offsets"]
        out[name] = (info["dtype"], data[begin:end].view(raw[info["dtype"]]).reshape(info["shape"]))
    return out


def as_float32(dtype: str, a: np.ndarray) -> np.ndarray:
    if dtype == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


def vocab(tokenizer_path: Path, vocab_size: int, gguf):
    """convert_hf_to_gguf.py _create_vocab_sentencepiece, for a tokenizer.model alone."""
    from sentencepiece import SentencePieceProcessor
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(tokenizer_path))
    types = gguf.TokenType
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    toktypes = [types.UNUSED] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        t = types.NORMAL
        if sp.IsUnknown(i):
            t = types.UNKNOWN
        elif sp.IsControl(i):
            t = types.CONTROL
        elif sp.IsUnused(i):
            t = types.UNUSED
        elif sp.IsByte(i):
            t = types.BYTE
        tokens[i], scores[i], toktypes[i] = sp.IdToPiece(i).encode("utf-8"), sp.GetScore(i), t
    return tokens, scores, toktypes, (sp.bos_id(), sp.eos_id(), sp.unk_id())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="Hugging Face directory: config.json + model.safetensors")
    p.add_argument("--tokenizer", help="tokenizer.model (default: the one in --model)")
    p.add_argument("--gguf-py", required=True, help="llama.cpp's gguf-py directory")
    p.add_argument("--outtype", choices=["f16", "f32"], default="f16")
    p.add_argument("--output", required=True, help="GGUF file to write")
    a = p.parse_args()

    sys.path.insert(0, a.gguf_py)
    import gguf

    model = Path(a.model)
    config_path, weights_path = model / "config.json", model / "model.safetensors"
    for f in (config_path, weights_path):
        if not f.is_file():
            sys.exit(f"error: {f} does not exist (expected a Hugging Face directory from `anyprec synth`)")
    tokenizer = Path(a.tokenizer) if a.tokenizer else model / "tokenizer.model"
    if not tokenizer.is_file():
        sys.exit(f"error: tokenizer {tokenizer} does not exist")
    h = json.loads(config_path.read_text())
    if h.get("model_type") != "llama":
        sys.exit(f"error: {config_path}: model_type is {h.get('model_type')!r}, not 'llama'")

    n_layer, n_head = h["num_hidden_layers"], h["num_attention_heads"]
    n_head_kv = h.get("num_key_value_heads", n_head)
    head_dim = h.get("head_dim", h["hidden_size"] // n_head)
    f16 = a.outtype == "f16"

    w = gguf.GGUFWriter(a.output + ".tmp", gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_name(model.name)
    w.add_block_count(n_layer)
    w.add_context_length(h["max_position_embeddings"])
    w.add_embedding_length(h["hidden_size"])
    w.add_feed_forward_length(h["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_freq_base(h.get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(h["rms_norm_eps"])
    if "head_dim" in h:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(h["vocab_size"])
    w.add_rope_dimension_count(head_dim)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tokens, scores, toktypes, (bos, eos, unk) = vocab(tokenizer, h["vocab_size"], gguf)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(toktypes)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_unk_token_id(unk)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)
    tensors = read_safetensors(weights_path)
    plan = []  # (gguf name, hf name, output dtype)
    for name, (_, arr) in tensors.items():
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            sys.exit(f"error: {weights_path}: cannot map tensor {name} to a llama GGUF name")
        keep_f32 = arr.ndim <= 1 or new.endswith("_norm.weight") or not f16
        plan.append((new, name, np.float32 if keep_f32 else np.float16))
        w.add_tensor_info(new, arr.shape, np.dtype(plan[-1][2]), arr.size * np.dtype(plan[-1][2]).itemsize)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for new, name, dtype in plan:
        src_dtype, arr = tensors[name]
        x = as_float32(src_dtype, arr)
        if name.endswith("q_proj.weight"):
            x = permute(x, n_head, n_head)
        elif name.endswith("k_proj.weight"):
            x = permute(x, n_head, n_head_kv)
        w.write_tensor_data(np.ascontiguousarray(x.astype(dtype)))
    w.close()
    os.replace(a.output + ".tmp", a.output)
    print(f"wrote {a.output}: {len(plan)} tensors, {a.outtype}")


if __name__ == "__main__":
    main()
