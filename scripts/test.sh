#!/usr/bin/env bash
# Installs what the tests need (Debian packages) and runs every test:
# unit tests and the interop tests that drive the real strata binary with
# nbdinfo, nbdcopy, qemu-io, qemu-img and python3-libnbd.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh --test
# SwiftPM leaves empty TemporaryDirectory.* folders in $TMPDIR on every
# build and test run; give it (and the tests) a private one, removed after.
# It stays on the same filesystem as /tmp, which the O_DIRECT cases need.
scratch=$(mktemp -d "${TMPDIR:-/tmp}/strata-test.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
export TMPDIR=$scratch
swift build --build-tests
swift test --skip-build
