"""How far fine-tuning moved a model: relative change ||W_student - W_base|| / ||W_base||
per kind of weight (q_proj, up_proj, ...) over all layers, between two model folders
with safetensors weights (a merged student and its base).

A student whose weights barely moved writes like its base model, whatever its loss
curve says; this tells the two cases apart in seconds.

    python benchmarks/weight_change.py BASE_DIR STUDENT_DIR [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


def load_weights(folder: Path) -> dict[str, np.ndarray]:
    weights: dict[str, np.ndarray] = {}
    for path in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(path))
    if not weights:
        raise SystemExit(f"{folder}: no *.safetensors weights")
    return weights


def kind(name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `q_proj`; layer-free names stay whole."""
    name = name.removesuffix(".weight")
    return name.rsplit(".", 1)[-1] if re.match(r"model\.layers\.\d+\.", name) else name


def relative_change(base: dict[str, np.ndarray], student: dict[str, np.ndarray]) -> dict[str, float]:
    squares: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for name, before in base.items():
        if name not in student:
            continue
        before = before.astype(np.float64)
        delta = student[name].astype(np.float64) - before
        for key in (kind(name), "all"):
            squares[key][0] += float(np.sum(delta * delta))
            squares[key][1] += float(np.sum(before * before))
    return {key: round(float(np.sqrt(d / b)), 6) for key, (d, b) in sorted(squares.items()) if b}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("student", type=Path)
    parser.add_argument("--out", type=Path, help="also write the numbers here as JSON")
    args = parser.parse_args()
    change = relative_change(load_weights(args.base), load_weights(args.student))
    for key, value in change.items():
        print(f"{key:28s} {100 * value:8.3f} %")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"relative_change": change}, indent=2) + "\n")


if __name__ == "__main__":
    main()
