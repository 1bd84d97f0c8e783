#!/usr/bin/env bash
# Obtain Fashion-MNIST (MIT licence, 70k real product photos) from Debian's
# `dataset-fashion-mnist` package, offline from the package mirror only.
#   root:     apt-get install (files land in /usr/share/datasets/fashion-mnist)
#   non-root: apt-get download + dpkg -x into .data/ (no root needed)
set -euo pipefail
SYSTEM_DIR=/usr/share/datasets/fashion-mnist
LOCAL_ROOT="$(cd "$(dirname "$0")/.." && pwd)/.data/fashion-mnist"
have() { [ -f "$1/train-images-idx3-ubyte.gz" ] && [ -f "$1/t10k-labels-idx1-ubyte.gz" ]; }

if have "$SYSTEM_DIR" || have "$LOCAL_ROOT$SYSTEM_DIR"; then exit 0; fi
if ! command -v apt-get >/dev/null; then
  echo "error: Fashion-MNIST not found and apt-get is unavailable." >&2
  echo "  Put the four *-ubyte.gz files in $SYSTEM_DIR or set JEST_FASHION_MNIST_DIR." >&2
  exit 1
fi
if [ "$(id -u)" = 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
else
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download dataset-fashion-mnist)
  mkdir -p "$LOCAL_ROOT"
  dpkg -x "$tmp"/dataset-fashion-mnist_*.deb "$LOCAL_ROOT"
  rm -rf "$tmp"
fi
if ! have "$SYSTEM_DIR" && ! have "$LOCAL_ROOT$SYSTEM_DIR"; then
  echo "error: dataset-fashion-mnist installed but its files are missing" >&2; exit 1
fi
