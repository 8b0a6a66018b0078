"""In-process transformers backend: any causal LM folder, cached hub id or GGUF file.

Generation is serialised behind a lock (one model, one forward pass at a time; callers
may still share the object across threads). On CPU it runs in fp32 with torch's thread
pool capped to the cores this process may use.

A call reuses the key-value cache of the previous one over their common token prefix:
an agent's or a student's continuations each extend the text before them, and the
passes of a GRPO group share their prompt, so on a CPU, where prefill is most of the
cost, only the new tokens are computed. A model whose weights change between calls (a
trainer's live model) must `forget_prefix()` after each change.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from starrec.llm.base import Completion, Constraint, LLMError, Message, NoChatTemplateError
from starrec.llm.constraints import TokenVocab, find_list_tokens, hf_logits_processor, maskable
from starrec.paths import available_cores

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

# A shorter common prefix is computed again: cropping and reusing a cache is not worth it.
MIN_REUSED_TOKENS = 16


@functools.lru_cache(maxsize=None)
def _cache_keyword() -> str:
    """What `generate` calls its key-value cache, in its arguments and its output:
    transformers renamed `past_key_values` to `cache`."""
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    fields = getattr(GenerateDecoderOnlyOutput, "__dataclass_fields__", {})
    return "cache" if "cache" in fields else "past_key_values"


def _libgomp_loaded() -> bool:
    try:
        return "libgomp" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def passive_openmp() -> None:
    """Make OpenMP threads sleep, not spin, while they wait for each other.

    torch and ggml (llama.cpp) both run their threads under OpenMP, which by default spins
    at every barrier (hundreds per token). When the cores are also busy with other work, a
    spinning thread burns its time slice waiting for one that was descheduled: on this
    2-core machine under load, SmolLM2 decoded 0.3 tokens/s (llama.cpp) and 1.3 tokens/s
    (transformers) instead of 47 and 15. libgomp reads the policy once, when it is first
    loaded, so this must run before torch or llama_cpp is imported; setting
    OMP_WAIT_POLICY in the environment (any value) overrides it.
    """
    if "OMP_WAIT_POLICY" in os.environ:
        return
    if _libgomp_loaded():
        log.warning("OpenMP was loaded before OMP_WAIT_POLICY was set: on a busy machine "
                    "decoding may be many times slower; export OMP_WAIT_POLICY=PASSIVE")
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def cap_torch_threads(threads: int | None) -> int:
    """Set torch's intra-op pool to `threads` (default: all usable cores), never more."""
    import torch

    cores = available_cores()
    n = max(1, min(threads or cores, cores))
    torch.set_num_threads(n)
    return n


def _eos_ids(model, tokenizer) -> tuple[int, ...]:
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(tokenizer.eos_token_id)
    ids.discard(None)
    if not ids:
        raise LLMError("the model has no end-of-sequence token (generation_config.eos_token_id)")
    return tuple(sorted(ids))


class HFChatModel:
    """`ChatModel` over a loaded transformers model and its tokenizer. `chat_template`
    (Jinja text) replaces the tokenizer's own, or gives one to a tokenizer without."""

    def __init__(self, model, tokenizer, name: str, threads: int | None = None,
                 chat_template: str | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        self.name = name
        self.threads = cap_torch_threads(threads) if model.device.type == "cpu" else None
        self.eos_ids = _eos_ids(model, tokenizer)
        self._vocab: TokenVocab | None = None
        self._lock = threading.Lock()
        self.reuse_prefix = True
        self._prefix: tuple[list[int], object] | None = None  # (token ids, their KV cache)
        self.reused_tokens = 0  # prompt tokens read from the cache, over the object's life

    def forget_prefix(self) -> None:
        """Drop the cached prefix (after the weights changed)."""
        with self._lock:
            self._prefix = None

    def _reusable(self, ids: list[int]) -> object | None:
        """The previous call's cache cropped to its common prefix with `ids` (leaving at
        least one token to compute), or None. Called under the lock; the cache is handed
        over, not copied, and the next call's cache replaces it."""
        if not self.reuse_prefix or self._prefix is None:
            return None
        cached_ids, cache = self._prefix
        self._prefix = None
        limit = min(len(cached_ids), len(ids) - 1)
        common = 0
        while common < limit and cached_ids[common] == ids[common]:
            common += 1
        if common < MIN_REUSED_TOKENS:
            return None
        cache.crop(common - cache.get_seq_length())  # a negative count: tokens removed
        self.reused_tokens += common
        return cache

    @classmethod
    def load(cls, path: str | Path, gguf_file: str | None = None, threads: int | None = None,
             name: str | None = None, chat_template: str | None = None) -> HFChatModel:
        """Load a folder or hub id (hub: only from the local cache unless online); with
        `gguf_file`, de-quantise that GGUF inside `path`."""
        passive_openmp()
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cuda = torch.cuda.is_available()
        dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
        extra = {"gguf_file": gguf_file} if gguf_file else {}
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), **extra)
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **extra)
        except OSError as exc:
            raise LLMError(f"cannot load a transformers model from {path!r}"
                           f"{' / ' + gguf_file if gguf_file else ''}: {exc}") from exc
        if cuda:
            model = model.to("cuda")
        return cls(model, tokenizer, name=name or str(path), threads=threads,
                   chat_template=chat_template)

    @property
    def vocab(self) -> TokenVocab:
        """Built on first use: scanning the vocabulary costs ~0.1 s for 49k tokens."""
        if self._vocab is None:
            tok = self.tokenizer
            pieces = tok.convert_ids_to_tokens(list(range(len(tok))))

            def decode(ids: list[int]) -> str:
                return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

            anchor = tok.encode("a", add_special_tokens=False)
            self._vocab = TokenVocab(
                size=self.model.get_output_embeddings().weight.shape[0],
                eos_ids=self.eos_ids,
                list_tokens=find_list_tokens(pieces, decode, anchor),
                encode=lambda text: tok.encode(text, add_special_tokens=False))
        return self._vocab

    def supports(self, constraint: Constraint) -> bool:
        return maskable(constraint)

    def render_chat(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        if not self.tokenizer.chat_template:
            raise NoChatTemplateError(self.name)
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def chat(self, messages: list[Message], *, max_tokens: int = 256, temperature: float = 0.0,
             stop: list[str] | None = None, constraint: Constraint | None = None,
             seed: int | None = None) -> Completion:
        # The template already writes any BOS the model expects.
        return self._generate(self.render_chat(messages), False, max_tokens, temperature, stop,
                              constraint, seed)

    def chat_token_ids(self, messages: list[Message]) -> list[int]:
        """The prompt tokens `chat` feeds the model for these messages."""
        return self.tokenizer(self.render_chat(messages), add_special_tokens=False)["input_ids"]

    def next_token_logprobs(self, token_ids: Sequence[int]) -> np.ndarray:
        """Log-probabilities of the next token after every prefix of `token_ids`, teacher
        forced in one pass: row i is the distribution after `token_ids[:i + 1]`, shape
        (len(token_ids), vocabulary size), float64. A test and diagnostic helper: engines
        and weight formats are compared on the same tokens with a tolerance, since their
        greedy texts part at the first near-tie that rounds differently on another CPU."""
        import torch

        ids = torch.tensor([list(token_ids)], dtype=torch.long, device=self.model.device)
        with self._lock, torch.inference_mode():
            logits = self.model(input_ids=ids).logits[0].to(torch.float64)
        return torch.log_softmax(logits, dim=-1).cpu().numpy()

    def complete(self, prompt: str, *, max_tokens: int = 256, temperature: float = 0.0,
                 stop: list[str] | None = None, constraint: Constraint | None = None,
                 seed: int | None = None) -> Completion:
        bos = self.tokenizer.bos_token
        add_special = not (bos and prompt.startswith(bos))
        return self._generate(prompt, add_special, max_tokens, temperature, stop, constraint, seed)

    def _generate(self, text: str, add_special: bool, max_tokens: int, temperature: float,
                  stop: list[str] | None, constraint: Constraint | None,
                  seed: int | None) -> Completion:
        start = time.perf_counter()
        new_ids, prompt_len, constraint = self._new_ids(text, add_special, max_tokens,
                                                        temperature, stop, constraint, seed)
        text_out = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        finish = "stop" if new_ids and new_ids[-1] in self.eos_ids else "length"
        if finish == "stop":
            new_ids.pop()  # the end-of-sequence token is not counted (as llama.cpp reports)
        cut = min((i for i in (text_out.find(s) for s in stop or []) if i >= 0), default=-1)
        if cut >= 0:
            text_out, finish = text_out[:cut], "stop"
        return Completion(text=text_out, prompt_tokens=prompt_len, completion_tokens=len(new_ids),
                          seconds=time.perf_counter() - start, finish_reason=finish,
                          constrained=constraint is not None)

    def _decoding(self) -> contextlib.AbstractContextManager:
        """The autograd context `generate` runs in (a trainer's live model overrides it)."""
        import torch

        return torch.inference_mode()

    def _new_ids(self, text: str, add_special: bool, max_tokens: int, temperature: float,
                 stop: list[str] | None, constraint: Constraint | None,
                 seed: int | None) -> tuple[list[int], int, Constraint | None]:
        """One `generate` call on `text`: the new token ids (end-of-sequence included),
        the prompt's length in tokens, and the constraint applied (None where this backend
        cannot mask it: free text, which the caller parses and repairs, see base.py)."""
        import torch

        if constraint is not None and not self.supports(constraint):
            constraint = None
        enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=add_special)
        enc = {k: v.to(self.model.device) for k, v in enc.items()}
        prompt_len = enc["input_ids"].shape[1]
        pad = self.tokenizer.pad_token_id
        kwargs: dict = {"max_new_tokens": max_tokens, "eos_token_id": list(self.eos_ids),
                        "pad_token_id": self.eos_ids[0] if pad is None else pad}
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
        else:
            kwargs.update(do_sample=False)
        if stop:
            kwargs.update(stop_strings=list(stop), tokenizer=self.tokenizer)
        if constraint is not None:
            kwargs["logits_processor"] = [hf_logits_processor(constraint, self.vocab, prompt_len)]
        devices = [self.model.device.index or 0] if self.model.device.type == "cuda" else []
        # A seed draws from a private generator state; without one, calls go on drawing from
        # the global one, so two unseeded samples differ (as with llama.cpp).
        rng = torch.random.fork_rng(devices=devices) if seed is not None else contextlib.nullcontext()
        with self._lock, rng, self._decoding():
            if seed is not None:
                torch.manual_seed(seed)
            past = self._reusable(enc["input_ids"][0].tolist())
            if past is not None:
                kwargs[_cache_keyword()] = past
            try:
                out = self.model.generate(**enc, **kwargs, return_dict_in_generate=True)
            except (torch.OutOfMemoryError, MemoryError) as exc:
                raise LLMError(f"{self.name}: out of memory generating {max_tokens} tokens "
                               f"after {prompt_len} prompt tokens") from exc
            sequence = out.sequences[0].tolist()
            cache = getattr(out, _cache_keyword(), None)
            if self.reuse_prefix and cache is not None and hasattr(cache, "crop"):
                self._prefix = (sequence[: cache.get_seq_length()], cache)
        return sequence[prompt_len:], prompt_len, constraint
