"""A fitted latent model as plain data: what the evidence store keeps of it.

Arrays travel as one `.npz` blob (no pickle), parameters and the item order as JSON, so a
store holds no executable object and a model is rebuilt from it by its own class.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class ModelState:
    kind: str  # "sasrec" | "als": the class that rebuilds it
    params: dict[str, Any]  # what the network or solver is built with
    items: list[str]  # item ids in the model's own index order
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def blob(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, **self.arrays)
        return buffer.getvalue()

    def header(self) -> str:
        return json.dumps({"kind": self.kind, "params": self.params, "items": self.items})

    @classmethod
    def load(cls, header: str, blob: bytes) -> ModelState:
        meta = json.loads(header)
        with np.load(io.BytesIO(blob), allow_pickle=False) as arrays:
            loaded = {name: arrays[name] for name in arrays.files}
        return cls(meta["kind"], meta["params"], list(meta["items"]), loaded)
