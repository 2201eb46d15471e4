#!/usr/bin/env bash
# Installs what the tests need (Debian packages) and runs every test:
# unit tests and the interop tests that drive the real strata binary with
# nbdinfo, nbdcopy, qemu-io, qemu-img and python3-libnbd.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh --test
swift build --build-tests
exec swift test --skip-build
