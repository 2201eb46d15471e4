#!/usr/bin/env bash
# Serve a raw image on a unix socket, look at it and copy it, as with qemu-nbd.
# Needs: strata on PATH (or STRATA=/path/to/strata), nbdinfo and nbdcopy
# (Debian: libnbd-bin). Everything happens in a temporary folder, removed at
# the end.
set -euo pipefail
strata=${STRATA:-strata}
work=$(mktemp -d)
server=
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

# A 64 MiB sparse image with a little data in it.
truncate -s 64M "$work/disk.raw"
printf 'hello from strata\n' | dd of="$work/disk.raw" bs=1M seek=8 conv=notrunc status=none

# -t: keep serving after a client leaves; -e 2: two clients at once;
# -x/-D: export name and description. Same options as qemu-nbd.
socket=$work/disk.sock
"$strata" serve -f raw -t -e 2 -x disk -D 'example disk' -k "$socket" "$work/disk.raw" &
server=$!
for _ in $(seq 100); do [ -S "$socket" ] && break; sleep 0.1; done

uri="nbd+unix:///disk?socket=$socket"
nbdinfo "$uri"                 # size, flags, block size, description
nbdinfo --map "$uri"           # which ranges hold data and which are holes
nbdcopy "$uri" "$work/copy.raw"  # the whole export into a local file
cmp "$work/disk.raw" "$work/copy.raw" && echo "copy is identical"
