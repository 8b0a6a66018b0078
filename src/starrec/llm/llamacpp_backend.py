"""In-process llama.cpp through llama-cpp-python (the optional extra `llamacpp`).

Decodes ~3x faster than transformers on CPU (SmolLM2-135M, 2 threads: ~40 vs ~13 tokens/s,
benchmarks/llm_engines.py). The chat template
comes from the GGUF's own metadata unless one is given (`llm.chat_template`); prompts are
tokenised here so that token counts and the constraint hooks see exactly what the model
sees.
"""

from __future__ import annotations

import json
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from starrec.llm.base import (Completion, Constraint, JSONSchemaConstraint, LLMError, Message,
                              NoChatTemplateError)
from starrec.llm.constraints import TokenVocab, find_list_tokens, llamacpp_logits_processor, maskable
from starrec.llm.hf_backend import passive_openmp
from starrec.paths import available_cores


def import_llama_cpp():
    passive_openmp()
    try:
        import llama_cpp
    except ImportError as exc:
        raise ImportError("the llama.cpp backend needs llama-cpp-python: "
                          "pip install -e .[llamacpp]  (compiles llama.cpp, several minutes)") from exc
    return llama_cpp


class LlamaCppChatModel:
    """`ChatModel` over one GGUF file loaded by llama-cpp-python. `chat_template` (Jinja
    text) replaces the GGUF's own, or gives one to a GGUF without."""

    def __init__(self, gguf_path: str | Path, *, threads: int | None = None, n_ctx: int = 8192,
                 name: str | None = None, chat_template: str | None = None) -> None:
        llama_cpp = import_llama_cpp()

        path = Path(gguf_path)
        if not path.is_file():
            raise LLMError(f"GGUF file not found: {path}")
        n_threads = max(1, min(threads or available_cores(), available_cores()))
        try:
            self.llama = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads,
                                         n_threads_batch=n_threads, verbose=False)
        except ValueError as exc:  # an architecture or file version this llama.cpp lacks
            raise LLMError(f"llama.cpp cannot load {path}: {exc}") from exc
        # Free the model while the interpreter is intact: llama-cpp-python's own __del__
        # at exit finds its modules torn down and prints a traceback.
        weakref.finalize(self, self.llama.close)
        self.name = name or path.name
        self._llama_cpp = llama_cpp
        self.eos_ids = (self.llama.token_eos(),)
        self.chat_template: str | None = (chat_template if chat_template is not None
                                          else self.llama.metadata.get("tokenizer.chat_template"))
        self._vocab: TokenVocab | None = None
        self._lock = threading.Lock()

    def _special_text(self, token_id: int) -> str:
        return "" if token_id < 0 else self.llama.detokenize([token_id], special=True).decode(
            "utf-8", errors="replace")

    def _tokenize(self, text: str, add_bos: bool) -> list[int]:
        return self.llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    @property
    def vocab(self) -> TokenVocab:
        if self._vocab is None:
            llama = self.llama
            n = llama.n_vocab()

            def decode(ids: list[int]) -> str:
                return llama.detokenize(ids).decode("utf-8", errors="replace")

            pieces = [llama._model.token_get_text(i) for i in range(n)]
            self._vocab = TokenVocab(
                size=n, eos_ids=self.eos_ids,
                list_tokens=find_list_tokens(pieces, decode, self._tokenize("a", add_bos=False)),
                encode=lambda text: llama.tokenize(text.encode("utf-8"), add_bos=False, special=False))
        return self._vocab

    def supports(self, constraint: Constraint) -> bool:
        return maskable(constraint) or isinstance(constraint, JSONSchemaConstraint)

    def render_chat(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        # transformers' renderer, so the text matches what the HF backend would build.
        from transformers.utils.chat_template_utils import render_jinja_template

        if not self.chat_template:
            raise NoChatTemplateError(self.name)
        rendered, _ = render_jinja_template(
            conversations=[list(messages)], chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._special_text(self.llama.token_bos()),
            eos_token=self._special_text(self.llama.token_eos()))
        return rendered[0]

    def chat(self, messages: list[Message], *, max_tokens: int = 256, temperature: float = 0.0,
             stop: list[str] | None = None, constraint: Constraint | None = None,
             seed: int | None = None) -> Completion:
        return self._generate(self._tokenize(self.render_chat(messages), add_bos=False),
                              max_tokens, temperature, stop, constraint, seed)

    def chat_token_ids(self, messages: list[Message]) -> list[int]:
        """The prompt tokens `chat` feeds the model for these messages."""
        return self._tokenize(self.render_chat(messages), add_bos=False)

    def next_token_logprobs(self, token_ids: Sequence[int]) -> np.ndarray:
        """Log-probabilities of the next token after every prefix of `token_ids`, teacher
        forced: row i is the distribution after `token_ids[:i + 1]`, shape
        (len(token_ids), vocabulary size), float64. A test and diagnostic helper (see
        `HFChatModel.next_token_logprobs`). The context was made without logits for every
        position (they would take n_ctx x vocabulary floats), so the batches here ask for
        them; the KV cache is cleared before and after, and the next generation evaluates
        its prompt from scratch."""
        ids = [int(i) for i in token_ids]
        llama = self.llama
        n_vocab = llama.n_vocab()
        rows: list[np.ndarray] = []
        with self._lock:
            llama.reset()
            llama._ctx.kv_cache_clear()
            try:
                for start in range(0, len(ids), llama.n_batch):
                    chunk = ids[start:start + llama.n_batch]
                    llama._batch.set_batch(batch=chunk, n_past=start, logits_all=True)
                    llama._ctx.decode(llama._batch)
                    logits = np.ctypeslib.as_array(llama._ctx.get_logits(),
                                                   shape=(len(chunk), n_vocab))
                    rows.append(logits.astype(np.float64))
            except (ValueError, RuntimeError) as exc:  # context overflow, decode failure
                raise LLMError(f"{self.name}: {exc}") from exc
            finally:
                llama.reset()
                llama._ctx.kv_cache_clear()
        logits = np.concatenate(rows) if rows else np.zeros((0, n_vocab))
        peak = logits.max(axis=-1, keepdims=True)
        return logits - peak - np.log(np.exp(logits - peak).sum(axis=-1, keepdims=True))

    def complete(self, prompt: str, *, max_tokens: int = 256, temperature: float = 0.0,
                 stop: list[str] | None = None, constraint: Constraint | None = None,
                 seed: int | None = None) -> Completion:
        bos = self._special_text(self.llama.token_bos())
        add_bos = self.llama._model.add_bos_token() and not (bos and prompt.startswith(bos))
        return self._generate(self._tokenize(prompt, add_bos=add_bos), max_tokens, temperature,
                              stop, constraint, seed)

    def _generate(self, prompt_ids: list[int], max_tokens: int, temperature: float,
                  stop: list[str] | None, constraint: Constraint | None,
                  seed: int | None) -> Completion:
        start = time.perf_counter()
        if constraint is not None and not self.supports(constraint):
            constraint = None
        kwargs: dict = {}
        if isinstance(constraint, JSONSchemaConstraint):
            kwargs["grammar"] = self._llama_cpp.LlamaGrammar.from_json_schema(
                json.dumps(constraint.schema), verbose=False)
        elif constraint is not None:
            kwargs["logits_processor"] = self._llama_cpp.LogitsProcessorList(
                [llamacpp_logits_processor(constraint, self.vocab, len(prompt_ids))])
        with self._lock:
            try:
                out = self.llama.create_completion(
                    prompt_ids, max_tokens=max_tokens, temperature=temperature, top_k=0,
                    top_p=1.0, min_p=0.0, repeat_penalty=1.0, stop=list(stop or []),
                    seed=seed, **kwargs)
            except (ValueError, RuntimeError) as exc:  # context overflow, decode failure
                raise LLMError(f"{self.name}: {exc}") from exc
        choice = out["choices"][0]
        return Completion(text=choice["text"], prompt_tokens=out["usage"]["prompt_tokens"],
                          completion_tokens=out["usage"]["completion_tokens"],
                          seconds=time.perf_counter() - start,
                          finish_reason=choice.get("finish_reason") or "stop",
                          constrained=constraint is not None)
