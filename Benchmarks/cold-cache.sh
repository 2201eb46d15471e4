# Sourced by run.sh and pairs.sh: how a "cold" measurement starts.
#
# drop_page_cache writes back dirty pages and drops the page cache, as
# `sync; echo 3 > /proc/sys/vm/drop_caches` does, and then, on a guest
# whose balloon device reports free pages to its host, waits until the
# freed memory has been reported.
#
# Why the wait: with free page reporting, the host takes back guest memory
# that stays free for a moment, and the guest's next touch of such a page
# faults on the host, which maps it afresh. A cold pass fills the page cache
# with about the image's size of freshly allocated pages. If the pages the
# drop freed have been reported by then, every one of them costs a host
# fault; if not, none does. Which of the two a pass meets depends on how
# long ago the last drop was and what ran since, not on the server. On the
# benchmark VM, cold buffered reads of a 2 GiB file by fio alone took
# 1.2-1.4 s or 1.7-2.1 s, alternating pass by pass, with no wait; 2.7-3.4 s
# every time after the reports settle; 1.3-1.7 s when 4 GiB of anonymous
# memory was touched just before. Waiting makes every cold pass meet the
# same memory, the settled state an idle VM is in. See Benchmarks/README.md,
# "Cold passes on a VM".
#
# COLD_MEMORY=backed measures the other state instead: right after the drop,
# twice the freed memory is touched (and so backed by the host again) and
# freed, and the pass takes the page cache from it. That is the state of
# hardware without a balloon, or of a VM whose memory stays in use. It is
# a race against the next report batch (about 2 s), so it is the noisier of
# the two.
#
# Needs root. Without /proc/sys/vm/drop_caches access it only syncs (the
# caller warns); without page reporting it does not wait.

PAGE_REPORTED=/sys/module/page_reporting/parameters/reported_kib

mem_free_kib() { awk '/^MemFree:/ {print $2}' /proc/meminfo; }

drop_page_cache() {
  local free_before reported_start reported now freed waited=0 quiet=0
  sync
  free_before=$(mem_free_kib)
  echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || return 0
  [ -r "$PAGE_REPORTED" ] || return 0
  freed=$(($(mem_free_kib) - free_before))
  # Less than 64 MiB freed (an O_DIRECT row): too little to matter.
  [ "$freed" -ge 65536 ] || return 0
  if [ "${COLD_MEMORY:-settled}" = backed ]; then
    touch_memory $((freed * 2))
    return 0
  fi
  reported_start=$(cat "$PAGE_REPORTED")
  reported=$reported_start
  # The kernel reports in batches about 2 s apart. Wait until nine tenths of
  # what the drop freed has been reported (not all of it: only free blocks
  # of page_reporting_order are reported), or until 5 s pass with no report,
  # and never more than 30 s.
  while [ "$waited" -lt 120 ]; do
    sleep 0.25
    waited=$((waited + 1))
    now=$(cat "$PAGE_REPORTED")
    if [ "$now" != "$reported" ]; then reported=$now quiet=0; else quiet=$((quiet + 1)); fi
    [ $(((reported - reported_start) * 10)) -ge $((freed * 9)) ] && break
    [ "$quiet" -ge 20 ] && break
  done
}

touch_memory() {  # touch_memory KIB: touch KIB of anonymous memory (at most
                  # what is free but 512 MiB), then free it
  local kib=$1 limit=$(($(mem_free_kib) - 524288))
  [ "$kib" -le "$limit" ] || kib=$limit
  [ "$kib" -gt 0 ] || return 0
  python3 -c '
import mmap, sys
size = int(sys.argv[1]) * 1024
m = mmap.mmap(-1, size)
for at in range(0, size, 4096):
    m[at] = 1
' "$kib"
}
