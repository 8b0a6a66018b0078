"""The transformers backend reuses the previous call's key-value cache over the common
token prefix: only new tokens are computed, the logits are those of a full pass (within
float tolerance), and `forget_prefix` (a trainer's weights changed) starts afresh."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def spied(tiny_lm_dir):
    from starrec.llm.hf_backend import HFChatModel

    chat = HFChatModel.load(tiny_lm_dir, threads=1)
    seen: list[tuple[int, torch.Tensor]] = []
    forward = chat.model.forward

    def spy(*args, **kwargs):
        out = forward(*args, **kwargs)
        ids = kwargs.get("input_ids", args[0] if args else None)
        seen.append((ids.shape[1], out.logits[0, -1].detach().clone()))
        return out

    chat.model.forward = spy
    return chat, seen


PROMPT = "The user watched Heat, Casino, Ronin and Fargo; of these twenty films choose one:"


def test_a_continuation_computes_only_its_new_tokens_with_the_same_logits(spied):
    chat, seen = spied
    ids = chat.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    first = chat.complete(PROMPT, max_tokens=4, temperature=0.0)
    assert seen[0][0] == len(ids) and chat.reused_tokens == 0
    seen.clear()
    longer = PROMPT + first.text + " and then, after the tool's answer,"
    chat.complete(longer, max_tokens=3, temperature=0.0)
    full = chat.tokenizer(longer, add_special_tokens=False)["input_ids"]
    computed, logits = seen[0]
    assert chat.reused_tokens >= len(ids) - 1 and computed == len(full) - chat.reused_tokens
    with torch.inference_mode():
        fresh = chat.model.__class__.forward(chat.model, input_ids=torch.tensor([full])).logits[0, -1]
    assert torch.allclose(logits, fresh, atol=1e-4)


def test_forget_and_a_short_common_prefix_compute_everything(spied):
    chat, seen = spied
    chat.complete(PROMPT, max_tokens=2, temperature=0.0)
    chat.forget_prefix()
    seen.clear()
    chat.complete(PROMPT, max_tokens=2, temperature=0.0)
    assert seen[0][0] == len(chat.tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    assert chat.reused_tokens == 0
    seen.clear()
    other = "Another prompt, about other films entirely: Alien, Aliens, Brazil"
    chat.complete(other, max_tokens=2, temperature=0.0)
    assert seen[0][0] == len(chat.tokenizer(other, add_special_tokens=False)["input_ids"])
    chat.reuse_prefix = False
    chat.complete(PROMPT, max_tokens=2, temperature=0.0)
    seen.clear()
    chat.complete(PROMPT + " more", max_tokens=2, temperature=0.0)
    assert chat.reused_tokens == 0
