#!/bin/bash
# Interleaved pairs: Strata against qemu-nbd on read-only rows, both serving
# the same file at once, in short runs that alternate between them.
#
# run.sh measures one server after the other, minutes apart. For the rows
# the device decides (4k randread QD1, cold nbdcopy), how fast the virtual
# disk answers drifts by more than the servers differ over those minutes,
# and a row changes sides from run to run. Here both servers are up at once
# on one file (read-only, so they can share it), and each pair runs one job
# on each, back to back, in ABBA order: the drift hits both alike. The
# report gives each row's paired ratios (Strata / qemu-nbd, per pair), their
# median with a bootstrap 95% interval, and how many pairs Strata won.
#
# See Benchmarks/README.md, "Interleaved pairs".
set -u -o pipefail

usage() {
  cat <<EOF
Usage: Benchmarks/pairs.sh [options]

  --formats LIST    raw,qcow2 or either (default raw,qcow2)
  --modes LIST      none (O_DIRECT: --cache=none --aio=native), defaults,
                    or both (default none,defaults)
  --jobs LIST       randread-4k-qd1, randread-4k-qd32, read-1m-qd8, nbdcopy
                    (default randread-4k-qd1,nbdcopy)
  --pairs N         pairs per row (default 20)
  --runtime SECS    seconds per fio run (default 3)
  --size SIZE       image size (default 2G)
  --dir DIR         work dir (default: fresh mktemp -d under /var/tmp)
  -h, --help        this help

Environment:
  STRATA            Strata binary (default: \$REPO/.build/release/strata)

fio jobs use fio's nbd engine; nbdcopy is one timed pass over the image,
after dropping the page cache (cold), as in run.sh. Needs root for that.
EOF
}

log()  { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die()  { printf 'pairs.sh: error: %s\n' "$*" >&2; exit 1; }

FORMATS=raw,qcow2 MODES=none,defaults JOBS=randread-4k-qd1,nbdcopy PAIRS=20 RUNTIME=3 SIZE=2G WORK=""
need_arg() { [ $# -ge 2 ] || die "$1 needs a value"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --formats) need_arg "$@"; FORMATS=$2; shift 2 ;;
    --modes)   need_arg "$@"; MODES=$2; shift 2 ;;
    --jobs)    need_arg "$@"; JOBS=$2; shift 2 ;;
    --pairs)   need_arg "$@"; PAIRS=$2; shift 2 ;;
    --runtime) need_arg "$@"; RUNTIME=$2; shift 2 ;;
    --size)    need_arg "$@"; SIZE=$2; shift 2 ;;
    --dir)     need_arg "$@"; WORK=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[[ "$PAIRS" =~ ^[1-9][0-9]*$ ]] || die "--pairs must be a positive integer, got '$PAIRS'"
[[ "$RUNTIME" =~ ^[1-9][0-9]*$ ]] || die "--runtime must be a positive integer, got '$RUNTIME'"
IFS=, read -ra FORMAT_LIST <<<"$FORMATS"
IFS=, read -ra MODE_LIST <<<"$MODES"
IFS=, read -ra JOB_LIST <<<"$JOBS"
for f in "${FORMAT_LIST[@]}"; do [[ "$f" =~ ^(raw|qcow2)$ ]] || die "unknown format '$f'"; done
for m in "${MODE_LIST[@]}"; do [[ "$m" =~ ^(none|defaults)$ ]] || die "unknown mode '$m'"; done
for j in "${JOB_LIST[@]}"; do
  [[ "$j" =~ ^(randread-4k-qd1|randread-4k-qd32|read-1m-qd8|nbdcopy)$ ]] || die "unknown job '$j'"
done

REPO=$(cd "$(dirname "$0")/.." && pwd)
STRATA=${STRATA:-$REPO/.build/release/strata}
[ -x "$STRATA" ] || die "no Strata binary at $STRATA (swift build -c release, or set STRATA)"
for t in fio qemu-nbd qemu-img nbdcopy nbdinfo python3; do
  command -v "$t" >/dev/null || die "missing tool: $t (scripts/install-deps.sh --test)"
done
[ "$(id -u)" = 0 ] || die "run as root: the cold nbdcopy passes drop the page cache"
BYTES=$(numfmt --from=iec "$SIZE") || die "bad --size '$SIZE'"
[ "$BYTES" -ge 1048576 ] || die "--size must be at least 1M, got '$SIZE'"

if [ -z "$WORK" ]; then WORK=$(mktemp -d /var/tmp/strata-pairs.XXXXXX); else mkdir -p "$WORK"; fi
SOCK_S=$WORK/strata.sock SOCK_Q=$WORK/qemu-nbd.sock
PIDS=()
stop_servers() {
  [ ${#PIDS[@]} -gt 0 ] && kill "${PIDS[@]}" 2>/dev/null
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
  PIDS=()
  rm -f "$SOCK_S" "$SOCK_Q"
}
trap 'stop_servers; rm -f "$WORK"/image.raw "$WORK"/image.qcow2 "$WORK"/run.json' EXIT

log "work dir $WORK; making a $SIZE image of random data"
fio --name=fill --filename="$WORK/image.raw" --size="$BYTES" --rw=write --bs=1M --ioengine=libaio --direct=1 \
    --iodepth=8 --refill_buffers --eta=never >"$WORK/fill.txt" 2>&1 || die "fio could not fill the image (see $WORK/fill.txt)"
if [[ ",$FORMATS," == *,qcow2,* ]]; then
  qemu-img convert -f raw -O qcow2 "$WORK/image.raw" "$WORK/image.qcow2" || die "qemu-img convert failed"
fi

start_servers() {  # start_servers FORMAT MODE
  local opts=()
  [ "$2" = none ] && opts=(--cache=none --aio=native)
  "$STRATA" serve -k "$SOCK_S" -f "$1" -r -t "${opts[@]}" "$WORK/image.$1" >"$WORK/strata.log" 2>&1 &
  PIDS+=($!)
  qemu-nbd -k "$SOCK_Q" -f "$1" -r -t "${opts[@]}" "$WORK/image.$1" >"$WORK/qemu-nbd.log" 2>&1 &
  PIDS+=($!)
  local sock
  for sock in "$SOCK_S" "$SOCK_Q"; do
    for _ in $(seq 300); do nbdinfo --size "nbd+unix:///?socket=$sock" >/dev/null 2>&1 && continue 2; sleep 0.1; done
    die "a server did not come up on $sock (see $WORK/strata.log, $WORK/qemu-nbd.log)"
  done
}

measure() {  # measure JOB SOCK -> prints IOPS (fio) or MiB/s (nbdcopy)
  local uri="nbd+unix:///?socket=$2" rw bs qd
  if [ "$1" = nbdcopy ]; then
    sync; echo 3 >/proc/sys/vm/drop_caches
    local t0 t1
    t0=$(date +%s%N)
    nbdcopy --request-size=262144 "$uri" null: || die "nbdcopy from $2 failed"
    t1=$(date +%s%N)
    echo $((BYTES / 1048576 * 1000000000 / (t1 - t0)))
    return
  fi
  case "$1" in
    randread-4k-qd1)  rw=randread bs=4k qd=1 ;;
    randread-4k-qd32) rw=randread bs=4k qd=32 ;;
    read-1m-qd8)      rw=read bs=1M qd=8 ;;
  esac
  fio --name=pair --ioengine=nbd --uri="$uri" --rw=$rw --bs=$bs --iodepth=$qd --time_based --runtime="$RUNTIME" \
      --eta=never --output-format=json --output="$WORK/run.json" >/dev/null 2>&1 || die "fio against $2 failed"
  python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["jobs"][0]["read"]["iops"]))' "$WORK/run.json"
}

RESULTS=$WORK/pairs.tsv
printf 'format\tmode\tjob\tpair\tstrata\tqemu_nbd\n' >"$RESULTS"
for fmt in "${FORMAT_LIST[@]}"; do
  for mode in "${MODE_LIST[@]}"; do
    start_servers "$fmt" "$mode"
    for job in "${JOB_LIST[@]}"; do
      log "$fmt $mode $job: $PAIRS pairs"
      measure "$job" "$SOCK_S" >/dev/null; measure "$job" "$SOCK_Q" >/dev/null  # warm-up, not counted
      for ((pair = 1; pair <= PAIRS; pair++)); do
        if ((pair % 4 == 1 || pair % 4 == 0)); then   # ABBA: S Q, Q S, Q S, S Q, ...
          s=$(measure "$job" "$SOCK_S"); q=$(measure "$job" "$SOCK_Q")
        else
          q=$(measure "$job" "$SOCK_Q"); s=$(measure "$job" "$SOCK_S")
        fi
        [[ "$s" =~ ^[0-9]+$ && "$q" =~ ^[0-9]+$ ]] || die "$fmt $mode $job pair $pair: no figure (strata '$s', qemu-nbd '$q')"
        printf '%s\t%s\t%s\t%d\t%s\t%s\n' "$fmt" "$mode" "$job" "$pair" "$s" "$q" >>"$RESULTS"
      done
    done
    stop_servers
  done
done

python3 - "$RESULTS" <<'PY'
import csv, random, statistics as st, sys
rows = {}
for r in csv.DictReader(open(sys.argv[1]), delimiter="\t"):
    rows.setdefault((r["format"], r["mode"], r["job"]), []).append((int(r["strata"]), int(r["qemu_nbd"])))
print(f"{'row':36} {'Strata':>8} {'qemu-nbd':>9}  {'paired ratio':>12}  {'95% interval':>13}  wins")
for (fmt, mode, job), pairs in rows.items():
    ratios = [s / q for s, q in pairs]
    random.seed(0)
    boot = sorted(st.median(random.choices(ratios, k=len(ratios))) for _ in range(2000))
    unit = "MiB/s" if job == "nbdcopy" else "IOPS"
    print(f"{fmt + ' ' + mode + ' ' + job + ' (' + unit + ')':36} {st.median(s for s, _ in pairs):>8.0f} "
          f"{st.median(q for _, q in pairs):>9.0f}  {st.median(ratios):>11.3f}x  {boot[50]:>5.3f}-{boot[1949]:.3f}  "
          f"{sum(r > 1 for r in ratios)}/{len(ratios)}")
PY
echo "pairs: $RESULTS"
