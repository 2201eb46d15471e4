#!/usr/bin/env bash
# Installs the Debian packages Strata needs to build (libaio). With --demo,
# also nbdinfo to look at the demo export; with --test, the tools the interop
# tests and benchmarks use as oracles (qemu-utils, libnbd, nbdkit, fio).
# Packages already present are skipped, so a second run is quick.
set -euo pipefail

build_pkgs=(libaio-dev zlib1g-dev libzstd-dev pkg-config)
test_pkgs=(qemu-utils libnbd-bin python3-libnbd nbdkit fio)

want=("${build_pkgs[@]}")
case "${1:-}" in
  --test) want+=("${test_pkgs[@]}") ;;
  --demo) want+=(libnbd-bin) ;;
  "") ;;
  *) echo "usage: $0 [--test|--demo]" >&2; exit 2 ;;
esac

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
