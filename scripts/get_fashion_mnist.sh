#!/usr/bin/env bash
# Obtain Fashion-MNIST (MIT licence, 70k real product photos) from Debian's
# `dataset-fashion-mnist` package, offline from the package mirror only.
#   already there: $JEST_FASHION_MNIST_DIR, /usr/share/datasets/fashion-mnist or .data/ -> no-op
#   root:          apt-get install (files land in /usr/share/datasets/fashion-mnist)
#   non-root:      apt-get download + dpkg -x into .data/fashion-mnist/ (no root needed)
# jest_curate/demo_data.py looks in the same three places.
set -euo pipefail
SYSTEM_DIR=/usr/share/datasets/fashion-mnist
LOCAL_ROOT="$(cd "$(dirname "$0")/.." && pwd)/.data/fashion-mnist"
have() { [ -n "$1" ] && [ -f "$1/train-images-idx3-ubyte.gz" ] && [ -f "$1/train-labels-idx1-ubyte.gz" ] \
           && [ -f "$1/t10k-images-idx3-ubyte.gz" ] && [ -f "$1/t10k-labels-idx1-ubyte.gz" ]; }
fail() {
  echo "error: $1" >&2
  echo "  Alternatively put the four *-ubyte.gz files in a directory and set" >&2
  echo "  JEST_FASHION_MNIST_DIR to it (e.g. copied from a machine with the package)." >&2
  exit 1
}

if have "${JEST_FASHION_MNIST_DIR:-}" || have "$SYSTEM_DIR" || have "$LOCAL_ROOT$SYSTEM_DIR"; then
  exit 0
fi
command -v apt-get >/dev/null || fail "Fashion-MNIST not found and apt-get is unavailable."
if [ "$(id -u)" = 0 ]; then
  echo "Installing dataset-fashion-mnist with apt-get ..." >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; } \
    || fail "apt-get install dataset-fashion-mnist failed (is a Debian/Ubuntu mirror reachable?)."
else
  echo "Downloading dataset-fashion-mnist into $LOCAL_ROOT (no root needed) ..." >&2
  command -v dpkg >/dev/null || fail "dpkg is needed to unpack the package."
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && apt-get download dataset-fashion-mnist) \
    || fail "apt-get download failed; the package lists may be stale: ask an admin to run
  'apt-get update', or run this script as root."
  mkdir -p "$LOCAL_ROOT"
  dpkg -x "$tmp"/dataset-fashion-mnist_*.deb "$LOCAL_ROOT"
fi
have "$SYSTEM_DIR" || have "$LOCAL_ROOT$SYSTEM_DIR" \
  || fail "dataset-fashion-mnist installed but its files are missing."
echo "Fashion-MNIST is ready." >&2
