"""A complete, randomly initialised transformers model folder, built offline in seconds.

It has what the real student has (a byte-level BPE tokenizer with SmolLM2-style ChatML
template, eos/pad tokens, a Llama causal LM) at a size where `generate` is instant, so
tests can exercise every code path that loads, prompts, constrains or fine-tunes a model.
The output is nonsense, but deterministic: the tokenizer is trained on a fixed corpus and
the weights come from a fixed seed.

`engine_agreement` is how tests compare two engines (or two weight formats) of one model:
next-token log-probabilities on the same tokens, within a tolerance, and the share of
positions whose most likely token is the same. Greedy text is not compared: it parts at
the first near-tie that rounds the other way on another CPU, and from there on differs
entirely, while a broken export or chat template moves most positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Same special tokens, same roles and same template shape as SmolLM2-135M-Instruct, minus
# its default system prompt (tests should see exactly the messages they pass).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TAGS = ["plan", "tool_call", "tool_response", "reflection", "recommend"]
WORDS = (
    "the user liked movies about space war love comedy drama action thriller adventure "
    "recent history long term interest profile items candidates rank ranking evidence "
    "users who rated also next popular similar because genre year title of and to in a is "
    "with for from this that score high low first last most least tool call response "
    "reflection plan recommend name arguments item id candidate index true false null"
).split()


def _corpus() -> list[str]:
    """Words, numbers, JSON and tagged trajectories: enough for merges like ` 17`, `":`,
    `<tool_call>` pieces, so multi-character tokens show up in constrained decoding."""
    lines = [" ".join(WORDS), " ".join(w.capitalize() for w in WORDS)]
    lines += [" ".join(str(i) for i in range(k, k + 25)) for k in range(0, 200, 25)]
    lines += ["[" + ", ".join(str((7 * i + k) % 20) for i in range(20)) + "]" for k in range(5)]
    lines += ['{"name": "co_consumption", "arguments": {"item": 12, "k": 5}}',
              '{"a": [1, 2, 3], "b": {"c": true, "d": null, "e": 0.5}}']
    lines += [f"<{t}>the user liked space movies</{t}>" for t in TAGS]
    lines.append("<plan>profile then rank</plan><tool_call>{\"name\": \"popularity\"}</tool_call>"
                 "<tool_response>item 3 is popular</tool_response><reflection>ok</reflection>"
                 "<recommend>[3, 0, 1, 2]</recommend>")
    return lines * 3


def make_tiny_lm(folder: Path, seed: int = 0, hidden: int = 32, layers: int = 2,
                 heads: int = 2, kv_heads: int | None = None, init_std: float = 0.02,
                 chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """Write tokenizer + config + safetensors weights of a tiny Llama into `folder`
    (`init_std` well above the default makes attention and logits far from uniform;
    `chat_template=None` makes a base model's folder, with no template)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    raw.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", bos_token="<|im_start|>",
                                        unk_token="<|endoftext|>",
                                        model_max_length=1024)
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads or heads, max_position_embeddings=1024,
                         initializer_range=init_std,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    return folder


def make_tiny_base_gguf(folder: Path, out: Path) -> Path:
    """A metadata-only GGUF for a tiny model folder, the way llama.cpp's converter writes
    one: hyper-parameters, the byte-level BPE vocabulary (special tokens as control
    tokens), merges, special token ids, chat template; no tensors. It stands in for the
    SmolLM2 GGUF as the base the exporter copies metadata from."""
    import json

    import gguf

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    by_id = {i: t for t, i in spec["model"]["vocab"].items()}
    by_id.update({a["id"]: a["content"] for a in spec["added_tokens"]})
    special = {a["id"] for a in spec["added_tokens"] if a["special"]}
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list([by_id[i] for i in range(len(by_id))])
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                            for i in range(len(by_id))])
    gguf.SpecialVocab(folder, load_merges=True).add_to_gguf(writer, quiet=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@dataclass(frozen=True)
class Agreement:
    """How closely two engines' next-token distributions agree on the same positions."""

    top1: float  # share of positions where both put the same token first
    max_gap: float  # largest |log p difference| over each position's likely tokens
    positions: int

    def holds(self, top1: float, max_gap: float) -> bool:
        return self.top1 >= top1 and self.max_gap <= max_gap


def engine_agreement(reference: np.ndarray, other: np.ndarray, likely: int = 5) -> Agreement:
    """Compare two (positions x vocabulary) log-probability arrays of one token sequence.
    The gap is taken over the `likely` tokens the reference ranks first at each position:
    the far tail of a distribution moves more under quantisation without changing any
    choice the model makes."""
    assert reference.shape == other.shape, (reference.shape, other.shape)
    top = np.argsort(-reference, axis=-1)[:, :likely]
    gap = np.abs(np.take_along_axis(reference, top, -1) - np.take_along_axis(other, top, -1))
    same = reference.argmax(-1) == other.argmax(-1)
    return Agreement(top1=float(same.mean()), max_gap=float(gap.max()),
                     positions=int(reference.shape[0]))
