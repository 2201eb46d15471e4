#!/usr/bin/env bash
# Installs what is missing, builds Strata and serves a demo image on a unix
# socket until Ctrl-C. In another terminal:
#   nbdinfo 'nbd+unix:///?socket=/tmp/strata-demo.sock'
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh --demo
# A private TMPDIR for the build: SwiftPM leaves TemporaryDirectory.*
# folders behind on every run (see scripts/test.sh).
build_tmp=$(mktemp -d "${TMPDIR:-/tmp}/strata-build.XXXXXX")
TMPDIR=$build_tmp swift build -c release || { rm -rf "$build_tmp"; exit 1; }
rm -rf "$build_tmp"
mkdir -p .demo
image=.demo/demo.raw
if [ ! -f "$image" ]; then
  truncate -s 256M "$image"
  printf 'Hello from Strata!\n' | dd of="$image" conv=notrunc status=none
  head -c 4M /dev/urandom | dd of="$image" bs=1M seek=64 conv=notrunc status=none
fi
socket=/tmp/strata-demo.sock
echo "Serving $image on $socket (Ctrl-C to stop). Try:"
echo "  nbdinfo 'nbd+unix:///?socket=$socket'"
echo "  nbdinfo --map 'nbd+unix:///?socket=$socket'"
exec .build/release/strata serve -f raw -t -e 0 -x '' -D 'Strata demo image' -k "$socket" "$image"
