#!/usr/bin/env bash
# Installs the Debian packages Strata needs. With --test, also the tools the
# interop tests and benchmarks use as oracles (qemu-utils, libnbd, fio…).
# Packages already present are skipped, so a second run is quick.
set -euo pipefail

build_pkgs=(libaio-dev pkg-config)
test_pkgs=(qemu-utils libnbd-bin python3-libnbd nbdkit fio)

want=("${build_pkgs[@]}")
if [ "${1:-}" = "--test" ]; then want+=("${test_pkgs[@]}"); fi

missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update
$sudo apt-get install -y --no-install-recommends "${missing[@]}"
