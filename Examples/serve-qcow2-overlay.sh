#!/usr/bin/env bash
# A golden base image with a per-VM qcow2 overlay: serve the overlay, write to
# it through NBD, and see that the base is untouched.
# Needs: strata on PATH (or STRATA=/path/to/strata) and qemu-io (Debian:
# qemu-utils). Everything happens in a temporary folder, removed at the end.
set -euo pipefail
strata=${STRATA:-strata}
work=$(mktemp -d)
server=
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

# The base (empty here; in practice a golden image). The overlay names it as
# its backing file (relative to the overlay, as qemu-img does) and starts empty.
"$strata" img create -f qcow2 "$work/base.qcow2" 64M
"$strata" img create -f qcow2 -b base.qcow2 -F qcow2 "$work/vm1.qcow2"
"$strata" img info --backing-chain "$work/vm1.qcow2"

socket=$work/vm1.sock
"$strata" serve -f qcow2 -t -k "$socket" "$work/vm1.qcow2" &
server=$!
for _ in $(seq 100); do [ -S "$socket" ] && break; sleep 0.1; done

uri="nbd+unix:///?socket=$socket"
qemu-io -f raw -c 'write -P 0xab 1M 64k' -c 'read -P 0xab 1M 64k' -c flush "$uri"
kill "$server"; wait "$server" 2>/dev/null || true; server=

# The write went to the overlay only; both images are consistent.
"$strata" img map --output=json "$work/vm1.qcow2"
"$strata" img check "$work/vm1.qcow2"
"$strata" img check "$work/base.qcow2"
qemu-io -f qcow2 -c 'read -P 0 1M 64k' "$work/base.qcow2" | grep -q 'read 65536' && echo "base is untouched"
