#!/usr/bin/env bash
# Strata benchmark: Strata vs qemu-nbd vs nbdkit vs the bare disk, on a raw
# image, and Strata vs qemu-nbd on qcow2 images (fully allocated, a two-layer
# backing chain, and allocation into an empty qcow2).
#
# Every server gets its own unix socket and runs alone: started, waited for,
# measured, stopped, then the next one. Job by job: every server of a row set
# runs one job, then the next job runs them in the reverse order, so the two
# sides of a row are measured back to back. Each job runs twice: cold (page cache
# dropped right before) and warm (repeated at once). Server CPU is read from
# /proc/PID/stat around each job and divided by the number of requests.
# Every server of the raw and qcow2 row sets serves the same file,
# served.img (chain and alloc: one file each), restored from its row set's
# master image in place and read once before it starts (stage_image,
# warm_host_cache), so no server gets better blocks or a warmer host cache.
#
# See Benchmarks/README.md for how to run it and how to read the tables.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)

usage() {
  cat <<EOF
Usage: Benchmarks/run.sh [options]

  --size SIZE       image size (default 2G; K/M/G/T suffixes, multiple of 1M)
  --runtime SECS    seconds per fio job (default 10)
  --quick           --size 256M --runtime 3 (explicit --size/--runtime win)
  --formats LIST    row sets to run, comma-separated subset of
                    raw,qcow2,chain,alloc (default: all)
  --only REGEX      run only SERVER:JOB pairs matching this extended regex,
                    e.g. 'qemu-nbd', ':randread', '^strata(-none)?:randread-4k-qd32$'.
                    It is also tried on FORMAT/SERVER:JOB, e.g. '^chain/strata'
  --dir DIR         work dir (default: fresh mktemp -d under /var/tmp)
  --build           build Strata (swift build -c release) if the binary is missing
  --keep-image      keep the test images in the work dir after the run
  --peers-first     start each row set with the peers (qemu-nbd, nbdkit, disk)
                    and run Strata after them in its first job (the next job
                    reverses the order), to see whether a row depends on its
                    place in the run
  --rounds N        run every row set N times: each round runs all the
                    selected row sets, and even rounds run the row sets and
                    their servers in reverse order; the tables show each
                    cell's median over the rounds, and each ratio's range
                    over the rounds' own ratios (default 1)
  --pin CPU         run every server and its client (fio, nbdcopy) on this
                    one CPU (taskset -c CPU), all servers alike. On a small VM
                    waking the other side on another CPU costs more than the
                    request itself; pinned rows show the per-request cost
                    without that (see README.md, "QD1 and CPU placement")
  --report DIR      only re-print the tables from an earlier run's work dir
  -h, --help        this help

Environment:
  STRATA            Strata binary (default: \$REPO/.build/release/strata).
                    Started as: \$STRATA serve -k SOCK -f raw|qcow2 -t [--cache=none --aio=native] IMAGE
  NBDCOPY_RUNS      nbdcopy copies per row, median reported (default 3)
  COLD_MEMORY       settled (default) or backed: which state of a VM's
                    memory a cold row meets (see cold-cache.sh, and
                    README.md, "Cold passes on a VM")

Formats: raw    image.raw, random data
         qcow2  image.qcow2 = qemu-img convert -O qcow2 image.raw (fully allocated)
         chain  overlay.qcow2 (every other 1 MiB written) -> base.qcow2 (whole image)
         alloc  4k randwrite QD32 into an empty qcow2, once (phase 'fresh')
Servers: raw:   strata-none, qemu-nbd-none, disk (O_DIRECT mode);
                strata, qemu-nbd, nbdkit-file, nbdkit-null (defaults mode).
         qcow2, chain, alloc: strata-none, qemu-nbd-none (O_DIRECT mode);
                strata, qemu-nbd (defaults mode).
Jobs:    randread-4k-qd1 randread-4k-qd32 randwrite-4k-qd32 read-1m-qd8
         write-1m-qd8 nbdcopy (alloc: randwrite-4k-qd32 only)
EOF
}

log()  { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
warn() { printf 'run.sh: WARNING: %s\n' "$*" >&2; }
die()  { printf 'run.sh: error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- options ---
SIZE="" RUNTIME="" QUICK=0 ONLY="" WORK="" BUILD=0 KEEP_IMAGE=0 REPORT_ONLY="" PIN_CPU="" PEERS_FIRST=0 ROUNDS=1
FORMATS_ARG=raw,qcow2,chain,alloc
need_arg() { [ $# -ge 2 ] || die "$1 needs an argument"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --size)       need_arg "$@"; SIZE=$2; shift 2 ;;
    --size=*)     SIZE=${1#*=}; shift ;;
    --runtime)    need_arg "$@"; RUNTIME=$2; shift 2 ;;
    --runtime=*)  RUNTIME=${1#*=}; shift ;;
    --quick)      QUICK=1; shift ;;
    --formats)    need_arg "$@"; FORMATS_ARG=$2; shift 2 ;;
    --formats=*)  FORMATS_ARG=${1#*=}; shift ;;
    --only)       need_arg "$@"; ONLY=$2; shift 2 ;;
    --only=*)     ONLY=${1#*=}; shift ;;
    --dir)        need_arg "$@"; WORK=$2; shift 2 ;;
    --dir=*)      WORK=${1#*=}; shift ;;
    --build)      BUILD=1; shift ;;
    --keep-image) KEEP_IMAGE=1; shift ;;
    --peers-first) PEERS_FIRST=1; shift ;;
    --rounds)     need_arg "$@"; ROUNDS=$2; shift 2 ;;
    --rounds=*)   ROUNDS=${1#*=}; shift ;;
    --pin)        need_arg "$@"; PIN_CPU=$2; shift 2 ;;
    --pin=*)      PIN_CPU=${1#*=}; shift ;;
    --report)     need_arg "$@"; REPORT_ONLY=$2; shift 2 ;;
    --report=*)   REPORT_ONLY=${1#*=}; shift ;;
    -h|--help)    usage; exit 0 ;;
    *)            usage >&2; die "unknown option: $1" ;;
  esac
done
if [ "$QUICK" = 1 ]; then
  SIZE=${SIZE:-256M}; RUNTIME=${RUNTIME:-3}
fi
SIZE=${SIZE:-2G}; RUNTIME=${RUNTIME:-10}
[[ "$RUNTIME" =~ ^[1-9][0-9]*$ ]] || die "--runtime must be a positive integer (seconds), got '$RUNTIME'"
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "--rounds must be a positive integer, got '$ROUNDS'"
ROUND=1
# Prefix for every server, fio and nbdcopy command (empty unless --pin).
PIN=()
if [ -n "$PIN_CPU" ]; then
  [[ "$PIN_CPU" =~ ^[0-9]+$ ]] || die "--pin must be a CPU number, got '$PIN_CPU'"
  command -v taskset >/dev/null || die "--pin needs taskset (Debian: util-linux)"
  taskset -c "$PIN_CPU" true 2>/dev/null || die "--pin: cannot run on CPU $PIN_CPU (taskset -c $PIN_CPU failed)"
  PIN=(taskset -c "$PIN_CPU")
fi
# Row sets, run in this order whatever order --formats lists them in (the
# reverse in even rounds).
ALL_FORMATS=(raw qcow2 chain alloc)
declare -A WANT=()
IFS=',' read -ra _fmts <<<"$FORMATS_ARG"
for f in "${_fmts[@]}"; do
  f=${f// /}
  [ -n "$f" ] || continue
  case "$f" in
    raw|qcow2|chain|alloc) WANT[$f]=1 ;;
    all) for g in "${ALL_FORMATS[@]}"; do WANT[$g]=1; done ;;
    *) die "--formats: unknown row set '$f' (use raw,qcow2,chain,alloc)" ;;
  esac
done
FORMATS=()
for f in "${ALL_FORMATS[@]}"; do
  if [ -n "${WANT[$f]:-}" ]; then FORMATS+=("$f"); fi
done
[ ${#FORMATS[@]} -gt 0 ] || die "--formats selects nothing (use raw,qcow2,chain,alloc)"
want() { [ -n "${WANT[$1]:-}" ]; }
QCOW=0   # any qcow2 row set
for f in qcow2 chain alloc; do
  if want "$f"; then QCOW=1; fi
done

# ------------------------------------------------------------- the report ---
# Reads WORK/meta.txt and the .tsv files, writes WORK/report.txt, prints it
# (Benchmarks/report.py).
report() {
  python3 "$SCRIPT_DIR/report.py" "$1"
}

if [ -n "$REPORT_ONLY" ]; then
  command -v python3 >/dev/null || die "python3 not found"
  [ -f "$REPORT_ONLY/results.tsv" ] || die "no results.tsv in $REPORT_ONLY"
  report "$REPORT_ONLY"
  exit 0
fi

# ------------------------------------------------------------ tool checks ---
missing=()
tools=(fio qemu-nbd nbdcopy nbdinfo python3 timeout numfmt)
if want raw; then tools+=(nbdkit); fi
if [ "$QCOW" = 1 ]; then tools+=(qemu-img); fi
for t in "${tools[@]}"; do
  command -v "$t" >/dev/null 2>&1 || missing+=("$t")
done
[ ${#missing[@]} -eq 0 ] || die "missing tools: ${missing[*]} (Debian: qemu-utils nbdkit libnbd-bin fio python3 coreutils; scripts/install-deps.sh --test)"
python3 -c 'import json, csv' 2>/dev/null || die "python3 does not work (needs the stdlib json/csv modules)"
# (no `grep -q`/`head` on a pipe anywhere: with pipefail, the writer's SIGPIPE
# would fail the pipeline at random)
ENGINES=$(fio --enghelp 2>/dev/null || true)
grep -qw nbd <<<"$ENGINES"    || die "this fio has no nbd ioengine (fio --enghelp); Debian's fio has it"
grep -qw libaio <<<"$ENGINES" || die "this fio has no libaio ioengine"
if want raw; then
  nbdkit --dump-plugin file >/dev/null 2>&1 || die "nbdkit file plugin not installed"
  nbdkit --dump-plugin null >/dev/null 2>&1 || die "nbdkit null plugin not installed"
fi

BYTES=$(numfmt --from=iec "$(tr '[:lower:]' '[:upper:]' <<<"${SIZE%iB}")" 2>/dev/null) \
  || die "cannot parse --size '$SIZE' (use e.g. 256M, 2G)"
[ "$BYTES" -ge $((64 << 20)) ] || die "--size must be at least 64M"
[ $((BYTES % (1 << 20))) -eq 0 ] || die "--size must be a multiple of 1M"
CLK_TCK=$(getconf CLK_TCK)

# ----------------------------------------------------------------- strata ---
STRATA=${STRATA:-$REPO/.build/release/strata}
HAVE_STRATA=0
if [ -x "$STRATA" ]; then
  HAVE_STRATA=1
elif [ "$BUILD" = 1 ]; then
  command -v swift >/dev/null || die "--build: swift not found"
  log "building Strata: (cd $REPO && swift build -c release)"
  (cd "$REPO" && swift build -c release) || die "swift build -c release failed"
  [ -x "$STRATA" ] || die "built, but no executable at STRATA=$STRATA"
  HAVE_STRATA=1
fi
NOTES=()
if [ "$HAVE_STRATA" = 0 ]; then
  msg="Strata binary not found at '$STRATA': skipping the strata and strata-none rows (pass --build, or set STRATA=/path/to/strata)"
  warn "$msg"
  NOTES+=("strata rows skipped: no binary at $STRATA")
fi

# ------------------------------------------------------------ definitions ---
# name|fio rw|bs|iodepth|unit|reads-only-ok
JOBS=(
  "randread-4k-qd1|randread|4k|1|IOPS|r"
  "randread-4k-qd32|randread|4k|32|IOPS|r"
  "randwrite-4k-qd32|randwrite|4k|32|IOPS|w"
  "read-1m-qd8|read|1M|8|MiB/s|r"
  "write-1m-qd8|write|1M|8|MiB/s|w"
  "nbdcopy|-|-|-|MiB/s|r"
)
# qcow2 and chain: the same jobs, reads first, so that the read jobs see the
# images as built (the write jobs allocate clusters in the chain's overlay).
QJOBS=(
  "randread-4k-qd1|randread|4k|1|IOPS|r"
  "randread-4k-qd32|randread|4k|32|IOPS|r"
  "read-1m-qd8|read|1M|8|MiB/s|r"
  "nbdcopy|-|-|-|MiB/s|r"
  "randwrite-4k-qd32|randwrite|4k|32|IOPS|w"
  "write-1m-qd8|write|1M|8|MiB/s|w"
)
# alloc: run once (phase "fresh"), not time-based: at most one pass over the
# image, every 4k block written at most once (fio's random map).
AJOBS=(
  "randwrite-4k-qd32|randwrite|4k|32|IOPS|w"
)
# id|mode
SERVERS=(
  "strata-none|odirect"
  "qemu-nbd-none|odirect"
  "disk|odirect"
  "strata|defaults"
  "qemu-nbd|defaults"
  "nbdkit-file|defaults"
  "nbdkit-null|defaults"
)
QSERVERS=(
  "strata-none|odirect"
  "qemu-nbd-none|odirect"
  "strata|defaults"
  "qemu-nbd|defaults"
)
# The same servers with Strata's last, in their order otherwise.
peers_first() {
  local spec
  for spec in "$@"; do [[ "$spec" == strata* ]] || echo "$spec"; done
  for spec in "$@"; do [[ "$spec" == strata* ]] && echo "$spec"; done
  return 0
}
if [ "$PEERS_FIRST" = 1 ]; then
  mapfile -t SERVERS < <(peers_first "${SERVERS[@]}")
  mapfile -t QSERVERS < <(peers_first "${QSERVERS[@]}")
fi
NBDCOPY_REQ=$((256 * 1024))
NBDCOPY_RUNS=${NBDCOPY_RUNS:-3}
[[ "$NBDCOPY_RUNS" =~ ^[1-9][0-9]*$ ]] || die "NBDCOPY_RUNS must be a whole number, 1 or more (got '$NBDCOPY_RUNS')"
COLD_MEMORY=${COLD_MEMORY:-settled}
[[ "$COLD_MEMORY" =~ ^(settled|backed)$ ]] || die "COLD_MEMORY must be settled or backed (got '$COLD_MEMORY')"

fmt_servers() {  # fmt_servers FORMAT -> sets FSERVERS and FJOBS arrays
  case "$1" in
    raw)         FSERVERS=("${SERVERS[@]}");  FJOBS=("${JOBS[@]}") ;;
    qcow2|chain) FSERVERS=("${QSERVERS[@]}"); FJOBS=("${QJOBS[@]}") ;;
    alloc)       FSERVERS=("${QSERVERS[@]}"); FJOBS=("${AJOBS[@]}") ;;
  esac
}
fmt_phases() {   # fmt_phases FORMAT -> sets PHASES array
  if [ "$1" = alloc ]; then PHASES=(fresh); else PHASES=(cold warm); fi
}
label() {        # label FORMAT SERVER: name in logs and file names (with the round, if several)
  local tag=""
  [ "$ROUNDS" -gt 1 ] && tag=".r$ROUND"
  if [ "$1" = raw ]; then echo "$2$tag"; else echo "$1.$2$tag"; fi
}

server_cmd() {   # server_cmd ID SOCK [DRIVER FILE] -> sets CMD array
  local id=$1 sock=$2 drv=${3:-raw} file=${4:-$IMG}
  case "$id" in
    strata-none)   CMD=("$STRATA" serve -k "$sock" -f "$drv" -t --cache=none --aio=native "$file") ;;
    strata)        CMD=("$STRATA" serve -k "$sock" -f "$drv" -t "$file") ;;
    qemu-nbd-none) CMD=(qemu-nbd -k "$sock" -f "$drv" -t --cache=none --aio=native "$file") ;;
    qemu-nbd)      CMD=(qemu-nbd -k "$sock" -f "$drv" -t "$file") ;;
    nbdkit-file)   CMD=(nbdkit -U "$sock" -f file "$file") ;;
    nbdkit-null)   CMD=(nbdkit -U "$sock" -f null size="$BYTES") ;;
    *) die "no command for server $id" ;;
  esac
}

job_applies() {  # job_applies SERVER JOBSPEC [FORMAT]
  local server=$1 fmt=${3:-raw} name rw bs qd unit ro
  IFS='|' read -r name rw bs qd unit ro <<<"$2"
  [ "$server" = nbdkit-null ] && [ "$ro" != r ] && return 1
  [ "$server" = disk ] && [ "$name" = nbdcopy ] && return 1
  # --only is tried on SERVER:JOB and on FORMAT/SERVER:JOB (either may match)
  if [ -n "$ONLY" ]; then
    grep -Eq -- "$ONLY" <<<"$server:$name"$'\n'"$fmt/$server:$name" || return 1
  fi
  return 0
}

selected=0
declare -A FMT_SELECTED=()
for fmt in "${FORMATS[@]}"; do
  fmt_servers "$fmt"
  n=0
  for sdef in "${FSERVERS[@]}"; do
    IFS='|' read -r server _ <<<"$sdef"
    [[ "$server" == strata* ]] && [ "$HAVE_STRATA" = 0 ] && continue
    for spec in "${FJOBS[@]}"; do
      if job_applies "$server" "$spec" "$fmt"; then n=$((n + 1)); fi
    done
  done
  FMT_SELECTED[$fmt]=$n
  selected=$((selected + n))
done
[ "$selected" -gt 0 ] || die "nothing to run: no SERVER:JOB (or FORMAT/SERVER:JOB) matches --only '$ONLY' in row sets ${FORMATS[*]} (servers: strata-none qemu-nbd-none disk strata qemu-nbd nbdkit-file nbdkit-null; qcow2 row sets: strata-none qemu-nbd-none strata qemu-nbd)"
summary=""
for fmt in "${FORMATS[@]}"; do summary+=" $fmt:${FMT_SELECTED[$fmt]}"; done
log "$selected server×job pairs to run ($summary ), each cold then warm (alloc: once), $ROUNDS round(s)"

# --------------------------------------------------------------- work dir ---
if [ -z "$WORK" ]; then
  WORK=$(mktemp -d /var/tmp/strata-bench.XXXXXX)
else
  mkdir -p "$WORK"
fi
WORK=$(cd "$WORK" && pwd)
RAW=$WORK/raw LOGS=$WORK/logs
mkdir -p "$RAW" "$LOGS"
FSTYPE=$(stat -f -c %T "$WORK")
case "$FSTYPE" in
  tmpfs|ramfs) warn "$WORK is on $FSTYPE: that is RAM, so 'cold' means nothing and the disk row measures memory (older kernels also refuse O_DIRECT there); use --dir on a real disk"
               NOTES+=("work dir is on $FSTYPE, not a real disk") ;;
esac
avail=$(df -P -B1 "$WORK" | awk 'NR==2 {print $4}')
for f in image.raw image.qcow2 base.qcow2 overlay.qcow2; do
  if [ -f "$WORK/$f" ]; then avail=$((avail + $(stat -c %b "$WORK/$f") * $(stat -c %B "$WORK/$f"))); fi
done
# Peak use: image.raw, the qcow2 masters (image.qcow2, base.qcow2,
# overlay.qcow2: 1 + 1 + 1/2 image) and the served files (served.img,
# served-chain.img, served-alloc.img: up to 1 image and its metadata each).
# A server image that fails qemu-img check is copied aside on top.
need=$((BYTES + (256 << 20) + BYTES + BYTES / 25))
if want qcow2; then need=$((need + BYTES + BYTES / 50)); fi
if want chain; then need=$((need + BYTES + BYTES / 2 + BYTES / 25 + BYTES + BYTES / 25)); fi
if want alloc; then need=$((need + BYTES + BYTES / 25)); fi
[ "$avail" -gt "$need" ] || die "not enough space in $WORK for the $SIZE images of row sets ${FORMATS[*]} ($avail bytes free, about $need needed)"

IMG=$WORK/image.raw
QIMG=$WORK/image.qcow2      # qcow2 row set: qemu-img convert -O qcow2 image.raw
BASE=$WORK/base.qcow2       # chain: the whole image ...
OVERLAY=$WORK/overlay.qcow2 # ... under an overlay holding every other 1 MiB
STAGE=$WORK/served.img      # what every raw and qcow2 server serves (see stage_image)
CSTAGE=$WORK/served-chain.img  # ... every chain server
ASTAGE=$WORK/served-alloc.img  # ... every alloc server
RESULTS=$WORK/results.tsv
DEVICE=$WORK/device.tsv     # per job: the device's own I/O count and time (see disk_counters)
CHECKS=$WORK/checks.tsv
META=$WORK/meta.txt
CLEAN_FILES=("$STAGE" "$CSTAGE" "$ASTAGE")  # removed on exit unless --keep-image

# ---------------------------------------------------------- cleanup trap ---
declare -A SERVER_PIDS=()   # pid -> socket
cleanup() {
  local rc=$? pid
  for pid in "${!SERVER_PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${!SERVER_PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    rm -f "${SERVER_PIDS[$pid]}"
  done
  if [ "$KEEP_IMAGE" = 0 ] && [ -n "${IMG:-}" ]; then
    rm -f "$IMG"
    for f in "${CLEAN_FILES[@]}"; do rm -f "$f"; done
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# -------------------------------------------------------------- page cache --
# drop_page_cache: see cold-cache.sh (it also waits for free page reporting).
source "$SCRIPT_DIR/cold-cache.sh"
DROP_OK=0
drop_caches() {
  if [ "$DROP_OK" = 1 ]; then drop_page_cache; else sync; fi
}
if (echo 3 > /proc/sys/vm/drop_caches) 2>/dev/null; then
  DROP_OK=1
else
  warn "cannot write /proc/sys/vm/drop_caches (run as root): 'cold' rows will not be cold"
fi

# ------------------------------------------------------------------ image ---
# Random, non-zero, fully allocated: fio writes fresh random buffers
# (--refill_buffers) with O_DIRECT, so nothing is sparse or all-zero and the
# image is not left in the page cache.
make_image() {
  log "creating $SIZE image $IMG"
  rm -f "$IMG"
  fio --name=fill --filename="$IMG" --size="$BYTES" --rw=write --bs=1M \
      --ioengine=libaio --direct=1 --iodepth=8 --refill_buffers \
      --end_fsync=1 --eta=never --output="$LOGS/fill.txt" >/dev/null \
    || die "creating the image with fio failed (see $LOGS/fill.txt)"
  [ "$(stat -c %s "$IMG")" -eq "$BYTES" ] || die "image has the wrong size"
  local alloc=$(( $(stat -c %b "$IMG") * $(stat -c %B "$IMG") ))
  [ "$alloc" -ge "$BYTES" ] || die "image is sparse ($alloc of $BYTES bytes allocated)"
  local nz
  nz=$(head -c 1048576 "$IMG" | tr -d '\0' | wc -c)
  [ "$nz" -gt 1000000 ] || die "image data looks like zeroes"
}

# The block device under WORK (its /proc/diskstats line), so that each job
# also records how long the device itself took per I/O: a slow row with a
# slow device is the disk's doing, a slow row with a normal one the server's.
# (readlink: /dev/mapper/NAME is dm-N in /proc/diskstats.)
DISK_DEV=$(basename "$(readlink -f "$(df --output=source "$WORK" 2>/dev/null | tail -1)")")
[ -n "$DISK_DEV" ] && [ -e "/sys/class/block/$DISK_DEV" ] || DISK_DEV=""

disk_counters() { # prints: reads read-ms writes write-ms of DISK_DEV, or n/a
  [ -n "$DISK_DEV" ] || { echo n/a; return 0; }
  awk -v d="$DISK_DEV" '$3 == d { print $4, $7, $8, $11; found = 1 } END { if (!found) print "n/a" }' /proc/diskstats
}

record_device() { # record_device SERVER MODE JOB PHASE FORMAT "BEFORE" "AFTER"
  local before=$6 after=$7 r0 rm0 w0 wm0 r1 rm1 w1 wm1
  [ "$before" != n/a ] && [ "$after" != n/a ] || return 0
  read -r r0 rm0 w0 wm0 <<<"$before"
  read -r r1 rm1 w1 wm1 <<<"$after"
  local line
  line=$(python3 -c "
r, w = $r1 - $r0, $w1 - $w0
f = lambda ms, n: f'{ms * 1000.0 / n:.1f}' if n else 'n/a'
print(r, w, f($rm1 - $rm0, r), f($wm1 - $wm0, w), sep='\t')")
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$ROUND" "$line" >>"$DEVICE"
}

cpu_ticks() {    # utime+stime+cutime+cstime of PID (all threads), in clock ticks
  local s
  s=$(<"/proc/$1/stat") || return 1
  s=${s##*) }
  local -a f
  read -ra f <<<"$s"
  echo $(( f[11] + f[12] + f[13] + f[14] ))
}

start_server() { # start_server ID SOCK [LABEL DRIVER FILE] -> sets SPID
  local id=${3:-$1} sock=$2 log=$LOGS/${3:-$1}.log
  rm -f "$sock"
  server_cmd "$1" "$sock" "${4:-raw}" "${5:-$IMG}"
  log "starting $id: ${CMD[*]}"
  echo "# ${CMD[*]}" >>"$log"   # one server start per job: the log keeps them all
  "${PIN[@]}" "${CMD[@]}" >>"$log" 2>&1 </dev/null &
  SPID=$!
  SERVER_PIDS[$SPID]=$sock
  local uri="nbd+unix:///?socket=$sock" deadline=$((SECONDS + 30))
  while [ "$SECONDS" -lt "$deadline" ]; do
    if ! kill -0 "$SPID" 2>/dev/null; then
      wait "$SPID" 2>/dev/null || true
      unset "SERVER_PIDS[$SPID]"
      warn "$id exited during startup; its log ($log):"
      sed 's/^/    /' "$log" >&2
      return 1
    fi
    if [ -S "$sock" ]; then
      local prc=0 sz
      sz=$(timeout 5 nbdinfo --size "$uri" 2>"$LOGS/$id.nbdinfo.err") || prc=$?
      if [ "$prc" = 0 ]; then
        [ "$sz" = "$BYTES" ] || warn "$id exports $sz bytes, expected $BYTES"
        return 0
      fi
      [ "$prc" = 124 ] && echo "nbdinfo: no answer within 5 s" >>"$LOGS/$id.nbdinfo.err"
    fi
    sleep 0.1
  done
  warn "$id did not answer on $sock within 30 s (log: $log); last nbdinfo error:"
  sed 's/^/    /' "$LOGS/$id.nbdinfo.err" >&2 || true
  stop_server "$id" "$SPID"
  return 1
}

stop_server() {  # stop_server ID PID
  local id=$1 pid=$2 sock=${SERVER_PIDS[$2]:-}
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    warn "$id (pid $pid) ignored SIGTERM for 10 s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
  unset "SERVER_PIDS[$pid]"
  [ -n "$sock" ] && rm -f "$sock"
  return 0
}

ERRORS=0
record() {       # server mode job phase unit value ios ticks lat_us status [format]
  local us="n/a" fmt=${11:-raw} name=$1
  [ "$fmt" = raw ] || name=$fmt/$1
  if [ "$8" != "n/a" ] && [ "$7" != "n/a" ] && [ "$7" -gt 0 ]; then
    us=$(python3 -c "print(f'{$8 * 1e6 / $CLK_TCK / $7:.3f}')")
  fi
  [ "$ROUNDS" -gt 1 ] && name="$name (round $ROUND)"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
    "$1" "$2" "$3" "$4" "$5" "$6" "$7" "$8" "$us" "$9" "${10}" "$fmt" "$ROUND" >>"$RESULTS"
  if [ "${10}" = ok ] && [ "$8" = "n/a" ]; then
    log "  $name $3 $4: $6 $5, $7 ios"
  elif [ "${10}" = ok ]; then
    log "  $name $3 $4: $6 $5, $7 ios, server cpu $8 ticks ($us µs/req)"
  else
    ERRORS=$((ERRORS + 1))
    warn "$name $3 $4 failed: ${10}"
  fi
}

fio_summary() {  # prints: value(iops or MiB/s) ios mean-lat-µs ; exits 1 on fio error
  python3 - "$1" "$2" <<'PYEOF'
import json, sys
path, unit = sys.argv[1], sys.argv[2]
with open(path) as f:
    txt = f.read()
j = json.loads(txt[txt.index("{"):])  # tolerate any banner before the JSON
iops = mib = 0.0; ios = 0; lat_w = 0.0; err = 0
for job in j["jobs"]:
    err |= job.get("error", 0)
    for d in ("read", "write"):
        x = job[d]
        iops += x["iops"]; mib += x["bw_bytes"] / 1048576.0; ios += x["total_ios"]
        lat_w += x["clat_ns"]["mean"] * x["total_ios"]
if err or ios == 0:
    sys.exit(1)
val = iops if unit == "IOPS" else mib
print(f"{val:.3f} {ios} {lat_w / ios / 1000.0:.2f}")
PYEOF
}

run_job() {      # run_job SERVER MODE PID JOBSPEC PHASE SOCK [FORMAT]
  local server=$1 mode=$2 pid=$3 spec=$4 phase=$5 sock=$6 fmt=${7:-raw}
  local name rw bs qd unit ro
  IFS='|' read -r name rw bs qd unit ro <<<"$spec"
  local base=$RAW/$(label "$fmt" "$server").$name.$phase
  local uri="nbd+unix:///?socket=$sock"

  if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
    record "$server" "$mode" "$name" "$phase" "$unit" "" 0 0 "" "server-died" "$fmt"
    return 1
  fi
  if [ "$phase" = cold ] || [ "$phase" = fresh ]; then drop_caches; fi
  # alloc: at most one pass over the empty image (no --time_based)
  local tb=(--time_based)
  if [ "$fmt" = alloc ]; then tb=(); fi

  local t0="n/a" t1="n/a" rc=0 d0 d1
  [ -n "$pid" ] && t0=$(cpu_ticks "$pid")
  d0=$(disk_counters)
  local copy_ns=()
  if [ "$name" = nbdcopy ]; then
    # One copy takes a second or two: take the median of NBDCOPY_RUNS, each
    # cold one after its own cache drop.
    local run s0 s1
    : >"$base.txt"
    for ((run = 1; run <= NBDCOPY_RUNS && rc == 0; run++)); do
      if [ "$run" -gt 1 ] && [ "$phase" = cold ]; then drop_caches; fi
      s0=$(date +%s%N)
      timeout -k 5 $((120 + BYTES / (5 << 20))) \
        "${PIN[@]}" nbdcopy --request-size=$NBDCOPY_REQ "$uri" null: >>"$base.txt" 2>&1 || rc=$?
      s1=$(date +%s%N)
      copy_ns+=($((s1 - s0)))
    done
  else
    local io=(--ioengine=nbd --uri="$uri")
    [ "$server" = disk ] && io=(--ioengine=libaio --direct=1 --filename="$STAGE")
    timeout -k 5 $((RUNTIME + 120)) \
      "${PIN[@]}" fio --name="$name" "${io[@]}" --rw="$rw" --bs="$bs" --iodepth="$qd" \
          "${tb[@]}" --runtime="$RUNTIME" --eta=never \
          --output-format=json --output="$base.json" >"$base.stdout" 2>&1 || rc=$?
  fi
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && t1=$(cpu_ticks "$pid")
  d1=$(disk_counters)
  record_device "$server" "$mode" "$name" "$phase" "$fmt" "$d0" "$d1"
  local ticks="n/a"
  if [ "$t0" != "n/a" ] && [ "$t1" != "n/a" ]; then ticks=$((t1 - t0)); fi

  if [ "$rc" -ne 0 ]; then
    record "$server" "$mode" "$name" "$phase" "$unit" "" 0 "$ticks" "" "exit-$rc" "$fmt"
    return 0
  fi
  if [ "$name" = nbdcopy ]; then
    local ns ios=$(((BYTES + NBDCOPY_REQ - 1) / NBDCOPY_REQ * ${#copy_ns[@]})) val
    ns=$(printf '%s\n' "${copy_ns[@]}" | sort -n | sed -n "$(( (${#copy_ns[@]} + 1) / 2 ))p")
    val=$(python3 -c "print(f'{$BYTES / 1048576 / ($ns / 1e9):.3f}')")
    printf 'bytes=%s runs(ns)=%s median seconds=%s MiB/s=%s GiB/s=%s\n' "$BYTES" "${copy_ns[*]}" \
      "$(python3 -c "print($ns/1e9)")" "$val" \
      "$(python3 -c "print(f'{$val/1024:.3f}')")" >>"$base.txt"
    record "$server" "$mode" "$name" "$phase" "$unit" "$val" "$ios" "$ticks" "" ok "$fmt"
  else
    local summ
    if summ=$(fio_summary "$base.json" "$unit" 2>>"$base.stdout"); then
      local val ios lat
      read -r val ios lat <<<"$summ"
      record "$server" "$mode" "$name" "$phase" "$unit" "$val" "$ios" "$ticks" "$lat" ok "$fmt"
    else
      record "$server" "$mode" "$name" "$phase" "$unit" "" 0 "$ticks" "" "fio-error" "$fmt"
    fi
  fi
}

# ---------------------------------------------------------- qcow2 images ---
qcheck_json() {  # qcheck_json IMAGE OUT.json -> exit code of qemu-img check
  local rc=0
  qemu-img check -f qcow2 --output=json "$1" >"$2" 2>"${2%.json}.err" || rc=$?
  if [ "$rc" -ne 0 ]; then
    qemu-img check -f qcow2 "$1" >>"${2%.json}.err" 2>&1 || true
  fi
  return "$rc"
}
qcheck_clusters() {  # qcheck_clusters OUT.json -> "allocated total" (or "? ?")
  python3 - "$1" <<'PYEOF' 2>/dev/null || echo "? ?"
import json, sys
j = json.load(open(sys.argv[1]))
print(j.get("allocated-clusters", 0), j["total-clusters"])
PYEOF
}

# qcow2 row set: a fully allocated qcow2 of the same data as image.raw.
make_qcow2() {
  log "creating $QIMG: qemu-img convert -f raw -O qcow2 image.raw image.qcow2"
  rm -f "$QIMG"
  CLEAN_FILES+=("$QIMG")
  qemu-img convert -f raw -O qcow2 "$IMG" "$QIMG" >"$LOGS/convert.qcow2.txt" 2>&1 \
    || die "qemu-img convert failed (see $LOGS/convert.qcow2.txt)"
  qcheck_json "$QIMG" "$LOGS/image.qcow2.check.json" \
    || die "qemu-img check $QIMG failed (see $LOGS/image.qcow2.check.err)"
  local a t
  read -r a t <<<"$(qcheck_clusters "$LOGS/image.qcow2.check.json")"
  [ "$a" = "$t" ] || die "image.qcow2 is not fully allocated ($a of $t clusters)"
}

# chain row set: base.qcow2 holds the whole image; overlay.qcow2 on top of it
# gets random data in every other 1 MiB (0-1M, 2-3M, ...), written by fio
# (rw=write:1M, refill_buffers) through qemu-nbd. So half of the data comes
# from each layer: 4k reads hit either layer, 1M reads alternate.
make_chain() {
  log "creating $BASE (qemu-img convert -O qcow2 image.raw) and $OVERLAY (every other 1 MiB)"
  rm -f "$BASE" "$OVERLAY"
  CLEAN_FILES+=("$BASE" "$OVERLAY")
  qemu-img convert -f raw -O qcow2 "$IMG" "$BASE" >"$LOGS/convert.base.txt" 2>&1 \
    || die "qemu-img convert failed (see $LOGS/convert.base.txt)"
  # relative backing name: the per-server copies of the overlay sit next to it
  (cd "$WORK" && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2) \
    || die "qemu-img create of the overlay failed"
  local sock=$WORK/chain-prep.sock
  start_server qemu-nbd "$sock" chain.prep qcow2 "$OVERLAY" \
    || die "could not serve $OVERLAY with qemu-nbd to fill it"
  local rc=0
  fio --name=overlay --ioengine=nbd --uri="nbd+unix:///?socket=$sock" \
      --rw=write:1M --bs=1M --iodepth=8 --refill_buffers --eta=never \
      --output="$LOGS/chain.prep.fio.txt" >/dev/null 2>&1 || rc=$?
  stop_server chain.prep "$SPID"
  [ "$rc" = 0 ] || die "filling the overlay with fio failed (see $LOGS/chain.prep.fio.txt)"
  qcheck_json "$OVERLAY" "$LOGS/overlay.qcow2.check.json" \
    || die "qemu-img check $OVERLAY failed (see $LOGS/overlay.qcow2.check.err)"
  local a t mib=$((BYTES >> 20))
  read -r a t <<<"$(qcheck_clusters "$LOGS/overlay.qcow2.check.json")"
  # 64 KiB clusters: 16 per MiB, written MiBs = ceil(mib / 2)
  [ "$a" = $(( (mib + 1) / 2 * 16 )) ] \
    || die "overlay.qcow2 has $a of $t clusters allocated, expected $(( (mib + 1) / 2 * 16 )) (every other 1 MiB)"
  sync
}

# Every server of the raw and qcow2 row sets serves the same file:
# served.img. Before a server starts, its row set's master image is written
# into served.img in place (dd conv=notrunc keeps the file's blocks where they
# are), so each server reads and writes the same blocks of the disk, and a
# qcow2 row and its raw row sit on the same blocks too, in every round.
# Separate copies do not: on the benchmark VM, fio 4k O_DIRECT randwrite
# straight on two copies of one file gave 34K and 77K IOPS, depending only on
# where each copy sat on the virtual disk. The chain's overlay is half the
# size and alloc starts empty: each has a file of its own, so that shrinking
# it never frees blocks of served.img between rounds.
stage_image() {  # stage_image FORMAT -> sets SIMG (not timed)
  local fmt=$1 master
  SIMG=$STAGE
  case "$fmt" in
    raw)   master=$IMG ;;
    qcow2) master=$QIMG ;;
    chain) master=$OVERLAY; SIMG=$CSTAGE ;;   # its backing name, base.qcow2, is relative
    alloc) SIMG=$ASTAGE
           qemu-img create -q -f qcow2 "$SIMG" "$BYTES" \
             || die "could not create an empty qcow2 as $SIMG"
           sync; return 0 ;;
  esac
  dd if="$master" of="$SIMG" bs=4M conv=notrunc,fsync status=none \
    || die "could not write $master into $SIMG"
  truncate -s "$(stat -c %s "$master")" "$SIMG" || die "could not truncate $SIMG"
  sync
}

# Reads each file once, sequentially with O_DIRECT (the guest page cache stays
# cold), right before a server starts. The hypervisor caches the virtual disk,
# so without this the first server to read a file pays for filling that cache
# and the next one does not: on the benchmark VM, fio 4k O_DIRECT randread
# QD32 on a file last touched an hour before gave 9.5K, 17K, 29K, then 67K
# IOPS in four runs of 10 s; after one sequential read it gave 75K at once.
warm_host_cache() {  # warm_host_cache FILE...
  local f
  for f in "$@"; do
    dd if="$f" of=/dev/null bs=4M iflag=direct status=none 2>/dev/null \
      || dd if="$f" of=/dev/null bs=4M status=none \
      || die "could not read $f"
  done
}

CHECK_FAILED=0
check_server_image() { # check_server_image FORMAT SERVER IMAGE BASE-STAMP JOB
  local fmt=$1 server=$2 img=$3 stamp=$4 job=$5 lbl rc=0 a t note="" rt=""
  lbl=$(label "$fmt" "$server").$job
  [ "$ROUNDS" -gt 1 ] && rt=" (round $ROUND)"
  qcheck_json "$img" "$LOGS/$lbl.check.json" || rc=$?
  read -r a t <<<"$(qcheck_clusters "$LOGS/$lbl.check.json")"
  if [ -n "$stamp" ] && [ "$(stat -c '%y %s' "$BASE")" != "$stamp" ]; then
    note="base.qcow2 was modified"
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$fmt" "$server" "$rc" "$a" "$t" "$note" "$ROUND" "$job" >>"$CHECKS"
  if [ "$rc" -ne 0 ] || [ -n "$note" ]; then
    CHECK_FAILED=$((CHECK_FAILED + 1))
    # served.img is about to be overwritten for the next server: keep a copy
    # (next to the base, for the chain, whose backing name is relative)
    local kept=$WORK/$lbl.failed.qcow2
    cp --sparse=always "$img" "$kept" || kept="(copy failed)"
    warn "qemu-img check of $fmt/$server's image after $job$rt: exit $rc${note:+, $note}; kept as $kept (details: $LOGS/$lbl.check.err)"
    sed 's/^/    /' "$LOGS/$lbl.check.err" >&2 || true
    if [ "$fmt" = chain ]; then   # the kept overlay needs its base after exit
      local keep=() f
      for f in "${CLEAN_FILES[@]}"; do [ "$f" = "$BASE" ] || keep+=("$f"); done
      CLEAN_FILES=("${keep[@]}")
    fi
  else
    log "  qemu-img check $fmt/$server after $job$rt: exit 0, $a/$t clusters allocated"
  fi
}

# ------------------------------------------------------------------- meta ---
first_line() { "$@" 2>&1 | sed -n 1p; }
versions="fio $(first_line fio --version | sed 's/^fio-//'); $(first_line qemu-nbd --version)"
if want raw; then versions+="; $(first_line nbdkit --version)"; fi
versions+="; $(first_line nbdcopy --version)"
[ "$HAVE_STRATA" = 1 ] && versions+="; strata: $STRATA"
{
  echo "date=$(date '+%F %T %z')"
  echo "host=$(hostname) ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'))"
  echo "cpus=$(nproc)"
  echo "kernel=$(uname -r)"
  echo "size=$SIZE"
  echo "bytes=$BYTES"
  echo "runtime=$RUNTIME"
  echo "pin=$PIN_CPU"
  echo "peers_first=$PEERS_FIRST"
  echo "rounds=$ROUNDS"
  echo "interleaved=1"
  echo "job_major=1"
  echo "fstype=$FSTYPE ($(df -P "$WORK" | awk 'NR==2 {print $1}'))"
  echo "load=$(cut -d' ' -f1-3 /proc/loadavg)"
  echo "clk_tck=$CLK_TCK"
  echo "drop_ok=$DROP_OK"
  echo "page_reporting=$([ -r "$PAGE_REPORTED" ] && echo "yes; cold memory: $COLD_MEMORY" || echo no)"
  echo "versions=$versions"
  echo "only=$ONLY"
  echo "formats=${FORMATS[*]}"
  echo "notes=$(IFS='|'; echo "${NOTES[*]:-}")"
} >"$META"
printf 'server\tmode\tjob\tphase\tunit\tvalue\tios\tcpu_ticks\tcpu_us_per_req\tlat_us_mean\tstatus\tformat\tround\n' >"$RESULTS"
printf 'server\tmode\tjob\tphase\tformat\tround\treads\twrites\tread_us_per_io\twrite_us_per_io\n' >"$DEVICE"
printf 'format\tserver\trc\tallocated\ttotal\tnote\tround\tjob\n' >"$CHECKS"

load1=$(cut -d' ' -f1 /proc/loadavg)
if python3 -c "import sys; sys.exit(0 if $load1 > 0.5 else 1)"; then
  warn "load average is $load1: something else is running, numbers will be noisy"
fi
log "work dir: $WORK  (size $SIZE, $RUNTIME s per job)"

# -------------------------------------------------------------------- run ---
make_image
if [ "${FMT_SELECTED[qcow2]:-0}" -gt 0 ]; then make_qcow2; fi
if [ "${FMT_SELECTED[chain]:-0}" -gt 0 ]; then make_chain; fi
if ! want raw && [ "$KEEP_IMAGE" = 0 ]; then rm -f "$IMG"; fi   # converted; not served

# Prints its arguments one per line, in reverse in even rounds, so that
# neither side of a comparison always goes first.
in_round_order() {
  if [ $((ROUND % 2)) = 0 ]; then printf '%s\n' "$@" | tac; else printf '%s\n' "$@"; fi
}

# Rounds outermost: every round runs each row set once, so a qcow2 row and
# the raw row it is compared with were measured one row set apart, not a
# whole row set's rounds apart. Even rounds run the row sets, and the
# servers in each, in the reverse order.
for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
  [ "$ROUNDS" -gt 1 ] && log "==== round $ROUND of $ROUNDS ===="
  mapfile -t fmt_order < <(in_round_order "${FORMATS[@]}")
  for fmt in "${fmt_order[@]}"; do
    [ "${FMT_SELECTED[$fmt]}" -gt 0 ] || continue
    fmt_servers "$fmt"
    fmt_phases "$fmt"
    if [ "$fmt" != raw ] || [ "$ROUNDS" -gt 1 ]; then log "==== row set $fmt ===="; fi
    mapfile -t order < <(in_round_order "${FSERVERS[@]}")
    # Job by job: every server runs one job, then the next job begins, in
    # the reverse server order. The servers compared on a row are measured
    # a minute apart, not a row set apart, and each is first as often as
    # second (see README.md, "Job by job").
    turn=0
    for spec in "${FJOBS[@]}"; do
      IFS='|' read -r name _ _ _ unit _ <<<"$spec"
      runners=()
      for sdef in "${order[@]}"; do
        IFS='|' read -r server _ <<<"$sdef"
        if job_applies "$server" "$spec" "$fmt"; then runners+=("$sdef"); fi
      done
      [ ${#runners[@]} -gt 0 ] || continue
      if [ $((turn % 2)) = 1 ]; then mapfile -t runners < <(printf '%s\n' "${runners[@]}" | tac); fi
      turn=$((turn + 1))
      for sdef in "${runners[@]}"; do
        IFS='|' read -r server mode <<<"$sdef"
        lbl=$(label "$fmt" "$server")
        if [[ "$server" == strata* ]] && [ "$HAVE_STRATA" = 0 ]; then
          [ "$turn" = 1 ] && log "skipping $lbl (no Strata binary)"
          continue
        fi
        drv=raw stamp="" SIMG=""
        if [ "$server" != nbdkit-null ]; then
          stage_image "$fmt"
          warm=("$SIMG")
          if [ "$fmt" = chain ]; then warm+=("$BASE"); stamp=$(stat -c '%y %s' "$BASE"); fi
          warm_host_cache "${warm[@]}"
        fi
        [ "$fmt" = raw ] || drv=qcow2
        sock="" SPID=""
        if [ "$server" != disk ]; then
          sock=$WORK/$lbl.sock
          started=0
          for try in 1 2 3; do
            if start_server "$server" "$sock" "$lbl" "$drv" "$SIMG"; then started=1; break; fi
            # a Strata binary that is being rebuilt fails to start: try again
            if [[ "$server" == strata* ]] && [ "$try" -lt 3 ]; then
              warn "retrying $lbl in 10 s"
              sleep 10
            else
              break
            fi
          done
          if [ "$started" = 0 ]; then
            for phase in "${PHASES[@]}"; do
              record "$server" "$mode" "$name" "$phase" "$unit" "" 0 0 "" "server-failed-to-start" "$fmt"
            done
            continue
          fi
        fi
        log "== $lbl: $name =="
        for phase in "${PHASES[@]}"; do
          run_job "$server" "$mode" "$SPID" "$spec" "$phase" "$sock" "$fmt" || break
        done
        if [ -n "$SPID" ]; then
          stop_server "$lbl" "$SPID"
        fi
        if [ "$fmt" != raw ]; then check_server_image "$fmt" "$server" "$SIMG" "$stamp" "$name"; fi
      done
    done
  done
done
if [ "$KEEP_IMAGE" = 0 ]; then
  rm -f "$QIMG" "$OVERLAY"
  [ "$CHECK_FAILED" -gt 0 ] || rm -f "$BASE"
fi

echo
report "$WORK"
echo
echo "Results: $WORK/report.txt  (raw fio json / nbdcopy timings: $RAW, per-job rows: $RESULTS, server logs: $LOGS)"
if [ "$CHECK_FAILED" -gt 0 ]; then
  warn "$CHECK_FAILED server image(s) failed qemu-img check or changed base.qcow2; see the end of the report and $LOGS/*.check.err"
fi
if [ "$ERRORS" -gt 0 ]; then
  warn "$ERRORS job(s) failed; see ERR cells and $RAW"
fi
if [ "$ERRORS" -gt 0 ] || [ "$CHECK_FAILED" -gt 0 ]; then
  exit 1
fi
