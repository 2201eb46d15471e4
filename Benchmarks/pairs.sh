#!/bin/bash
# Interleaved pairs: Strata against qemu-nbd, both serving the same file
# (at once for reads), in short runs that alternate between them; or
# (--against raw) Strata's qcow2 export against Strata's raw export of the
# same bytes of the same file.
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
# --against raw measures what the qcow2 layer costs. A second file would
# not do: where a copy sits on the virtual disk moves 4k O_DIRECT figures by
# 2x (see run.sh, stage_image). qemu-img convert lays a qcow2's data out in
# runs of one L2 table's reach (512 MiB at 64 KiB clusters); a raw export of
# the qcow2 file with --offset at the first run's host offset serves those
# very blocks. Every fio job is limited to that run (--size), so both sides
# read and write the same disk blocks. nbdcopy copies each whole export and
# counts each export's own size. Each measurement gets a server of its own
# (the two exports cannot both hold the file for writing), started before
# the timed part.
#
# Write jobs (randwrite-4k-qd32, write-1m-qd8) cannot share the file: for
# them each measurement starts a read-write server of its own before the
# timed part, as --against raw does. --cold drops the page cache before
# every fio run too, not only before nbdcopy passes.
#
# See Benchmarks/README.md, "Interleaved pairs".
set -u -o pipefail

usage() {
  cat <<EOF
Usage: Benchmarks/pairs.sh [options]

  --against PEER    qemu-nbd (default), or raw: Strata's qcow2 export against
                    Strata's raw export of the same blocks (see the top of
                    this script); --formats does not apply
  --formats LIST    raw, qcow2, chain (overlay.qcow2 with random data in every
                    other 1 MiB over base.qcow2, as in run.sh), comma-separated
                    (default raw,qcow2)
  --modes LIST      none (O_DIRECT: --cache=none --aio=native), defaults,
                    or both (default none,defaults)
  --jobs LIST       randread-4k-qd1, randread-4k-qd32, read-1m-qd8, nbdcopy,
                    randwrite-4k-qd32, write-1m-qd8 (writes: not on chain)
                    (default randread-4k-qd1,nbdcopy)
  --cold            drop the page cache before every fio run too (nbdcopy
                    passes are always cold)
  --pairs N         pairs per row (default 20)
  --runtime SECS    seconds per fio run (default 3)
  --size SIZE       image size (default 2G)
  --dir DIR         work dir (default: fresh mktemp -d under /var/tmp)
  --cold-memory M   settled (default) or backed: which state of a VM's
                    memory a cold nbdcopy pass meets (see cold-cache.sh)
  -h, --help        this help

Environment:
  STRATA            Strata binary (default: \$REPO/.build/release/strata)

fio jobs use fio's nbd engine; nbdcopy is one timed pass over the image,
after dropping the page cache (cold), as in run.sh. Needs root for that.
EOF
}

log()  { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die()  { printf 'pairs.sh: error: %s\n' "$*" >&2; exit 1; }

COLD=0 COLD_MEMORY=settled AGAINST=qemu-nbd FORMATS=raw,qcow2 MODES=none,defaults JOBS=randread-4k-qd1,nbdcopy PAIRS=20 RUNTIME=3 SIZE=2G WORK=""
need_arg() { [ $# -ge 2 ] || die "$1 needs a value"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --against) need_arg "$@"; AGAINST=$2; shift 2 ;;
    --formats) need_arg "$@"; FORMATS=$2; FORMATS_GIVEN=1; shift 2 ;;
    --modes)   need_arg "$@"; MODES=$2; shift 2 ;;
    --jobs)    need_arg "$@"; JOBS=$2; shift 2 ;;
    --pairs)   need_arg "$@"; PAIRS=$2; shift 2 ;;
    --runtime) need_arg "$@"; RUNTIME=$2; shift 2 ;;
    --size)    need_arg "$@"; SIZE=$2; shift 2 ;;
    --dir)     need_arg "$@"; WORK=$2; shift 2 ;;
    --cold-memory) need_arg "$@"; COLD_MEMORY=$2; shift 2 ;;
    --cold)    COLD=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[[ "$PAIRS" =~ ^[1-9][0-9]*$ ]] || die "--pairs must be a positive integer, got '$PAIRS'"
[[ "$RUNTIME" =~ ^[1-9][0-9]*$ ]] || die "--runtime must be a positive integer, got '$RUNTIME'"
[[ "$COLD_MEMORY" =~ ^(settled|backed)$ ]] || die "--cold-memory must be settled or backed, got '$COLD_MEMORY'"
[[ "$AGAINST" =~ ^(qemu-nbd|raw)$ ]] || die "--against must be qemu-nbd or raw, got '$AGAINST'"
if [ "$AGAINST" = raw ]; then
  [ -z "${FORMATS_GIVEN:-}" ] || die "--against raw compares a qcow2 export with a raw one: leave out --formats"
  FORMATS=qcow2
fi
IFS=, read -ra FORMAT_LIST <<<"$FORMATS"
IFS=, read -ra MODE_LIST <<<"$MODES"
IFS=, read -ra JOB_LIST <<<"$JOBS"
for f in "${FORMAT_LIST[@]}"; do [[ "$f" =~ ^(raw|qcow2|chain)$ ]] || die "unknown format '$f'"; done
for m in "${MODE_LIST[@]}"; do [[ "$m" =~ ^(none|defaults)$ ]] || die "unknown mode '$m'"; done
is_write() { [[ "$1" =~ ^(randwrite-4k-qd32|write-1m-qd8)$ ]]; }
for j in "${JOB_LIST[@]}"; do
  [[ "$j" =~ ^(randread-4k-qd1|randread-4k-qd32|read-1m-qd8|nbdcopy|randwrite-4k-qd32|write-1m-qd8)$ ]] \
    || die "unknown job '$j'"
  # Writes would fill the overlay pass by pass: no two passes would read the same chain.
  if is_write "$j" && [[ ",$FORMATS," == *,chain,* ]]; then die "write jobs change a chain as they go: not with chain"; fi
done

REPO=$(cd "$(dirname "$0")/.." && pwd)
source "$REPO/Benchmarks/cold-cache.sh"   # drop_page_cache
STRATA=${STRATA:-$REPO/.build/release/strata}
[ -x "$STRATA" ] || die "no Strata binary at $STRATA (swift build -c release, or set STRATA)"
for t in fio qemu-nbd qemu-img nbdcopy nbdinfo python3; do
  command -v "$t" >/dev/null || die "missing tool: $t (scripts/install-deps.sh --test)"
done
[ "$(id -u)" = 0 ] || die "run as root: the cold nbdcopy passes drop the page cache"
BYTES=$(numfmt --from=iec "$SIZE") || die "bad --size '$SIZE'"
[ "$BYTES" -ge 1048576 ] || die "--size must be at least 1M, got '$SIZE'"

if [ -z "$WORK" ]; then WORK=$(mktemp -d /var/tmp/strata-pairs.XXXXXX); else mkdir -p "$WORK"; fi
SOCK_A=$WORK/a.sock SOCK_B=$WORK/b.sock
if [ "$AGAINST" = raw ]; then NAME_A=qcow2 NAME_B=raw; else NAME_A=strata NAME_B=qemu_nbd; fi
PIDS=()
stop_servers() {
  [ ${#PIDS[@]} -gt 0 ] && kill "${PIDS[@]}" 2>/dev/null
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
  PIDS=()
  rm -f "$SOCK_A" "$SOCK_B"
}
trap 'stop_servers; rm -f "$WORK"/image.raw "$WORK"/image.qcow2 "$WORK"/base.qcow2 "$WORK"/overlay.qcow2 "$WORK"/run.json' EXIT

log "work dir $WORK; making a $SIZE image of random data"
[ -r "$PAGE_REPORTED" ] && log "free page reporting: cold passes meet $COLD_MEMORY memory (see Benchmarks/cold-cache.sh)"
fio --name=fill --filename="$WORK/image.raw" --size="$BYTES" --rw=write --bs=1M --ioengine=libaio --direct=1 \
    --iodepth=8 --refill_buffers --eta=never >"$WORK/fill.txt" 2>&1 || die "fio could not fill the image (see $WORK/fill.txt)"
if [[ ",$FORMATS," == *,qcow2,* ]]; then
  qemu-img convert -f raw -O qcow2 "$WORK/image.raw" "$WORK/image.qcow2" || die "qemu-img convert failed"
fi
if [[ ",$FORMATS," == *,chain,* ]]; then
  # run.sh's chain: base.qcow2 holds the whole image, overlay.qcow2 random
  # data in every other 1 MiB, written through qemu-nbd.
  qemu-img convert -f raw -O qcow2 "$WORK/image.raw" "$WORK/base.qcow2" || die "qemu-img convert failed"
  (cd "$WORK" && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2) || die "qemu-img create failed"
  qemu-nbd -k "$SOCK_B" -f qcow2 -t "$WORK/overlay.qcow2" >"$WORK/b.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 300); do nbdinfo --size "nbd+unix:///?socket=$SOCK_B" >/dev/null 2>&1 && break; sleep 0.1; done
  fio --name=overlay --ioengine=nbd --uri="nbd+unix:///?socket=$SOCK_B" --rw=write:1M --bs=1M --iodepth=8 \
      --refill_buffers --eta=never >"$WORK/overlay.txt" 2>&1 || { stop_servers; die "fio could not fill the overlay (see $WORK/overlay.txt)"; }
  stop_servers
fi
LIMIT=""   # --against raw: bytes every fio job stays within
if [ "$AGAINST" = raw ]; then
  rm -f "$WORK/image.raw"
  # The first data run: guest offset 0, its host offset and its length.
  read -r RUN_OFFSET LIMIT < <(qemu-img map --output=json "$WORK/image.qcow2" | python3 -c '
import json, sys
m = json.load(sys.stdin)[0]
if m["start"] != 0 or not m["data"] or "offset" not in m: sys.exit("no data run at guest offset 0")
print(m["offset"], m["length"])') || die "could not map image.qcow2"
  log "qcow2 data run at host offset $RUN_OFFSET, $LIMIT bytes: every fio job stays within it"
fi

image_of() {  # image_of FORMAT -> the file a server opens, and its -f
  case "$1" in
    chain) echo "$WORK/overlay.qcow2 qcow2" ;;
    *)     echo "$WORK/image.$1 $1" ;;
  esac
}

wait_for() {  # wait_for SOCK; on failure stops what was started, then dies
  for _ in $(seq 300); do nbdinfo --size "nbd+unix:///?socket=$1" >/dev/null 2>&1 && return; sleep 0.1; done
  stop_servers
  die "a server did not come up on $1 (see $WORK/a.log, $WORK/b.log)"
}

start_servers() {  # start_servers FORMAT MODE [a|b]: both read-only, or one side alone read-write
  local opts=() side=${3:-both} file fmt
  [ "$2" = none ] && opts=(--cache=none --aio=native)
  read -r file fmt < <(image_of "$1")
  if [ "$AGAINST" = raw ]; then
    # Read-write, one at a time: the randwrite job writes through either.
    if [ "$side" = a ]; then
      "$STRATA" serve -k "$SOCK_A" -f qcow2 -t "${opts[@]}" "$WORK/image.qcow2" >"$WORK/a.log" 2>&1 &
      PIDS+=($!); wait_for "$SOCK_A"
    else
      "$STRATA" serve -k "$SOCK_B" -f raw -o "$RUN_OFFSET" -t "${opts[@]}" "$WORK/image.qcow2" >"$WORK/b.log" 2>&1 &
      PIDS+=($!); wait_for "$SOCK_B"
    fi
    return
  fi
  case "$side" in
    a) "$STRATA" serve -k "$SOCK_A" -f "$fmt" -t "${opts[@]}" "$file" >"$WORK/a.log" 2>&1 &
       PIDS+=($!); wait_for "$SOCK_A" ;;
    b) qemu-nbd -k "$SOCK_B" -f "$fmt" -t "${opts[@]}" "$file" >"$WORK/b.log" 2>&1 &
       PIDS+=($!); wait_for "$SOCK_B" ;;
    *) "$STRATA" serve -k "$SOCK_A" -f "$fmt" -r -t "${opts[@]}" "$file" >"$WORK/a.log" 2>&1 &
       PIDS+=($!)
       qemu-nbd -k "$SOCK_B" -f "$fmt" -r -t "${opts[@]}" "$file" >"$WORK/b.log" 2>&1 &
       PIDS+=($!)
       wait_for "$SOCK_A"; wait_for "$SOCK_B" ;;
  esac
}

# Whether each measurement of JOB gets a server of its own: writes, and
# every job with --against raw (the two exports cannot both write the file).
own_server() { [ "$AGAINST" = raw ] || is_write "$1"; }

measure() {  # measure JOB SOCK -> prints IOPS (fio) or MiB/s (nbdcopy)
  local uri="nbd+unix:///?socket=$2" rw bs qd size=()
  if [ "$1" = nbdcopy ]; then
    local t0 t1 bytes
    bytes=$(nbdinfo --size "$uri") || die "nbdinfo against $2 failed"
    drop_page_cache
    t0=$(date +%s%N)
    nbdcopy --request-size=262144 "$uri" null: || die "nbdcopy from $2 failed"
    t1=$(date +%s%N)
    echo $((bytes * 1000000000 / 1048576 / (t1 - t0)))
    return
  fi
  case "$1" in
    randread-4k-qd1)   rw=randread bs=4k qd=1 ;;
    randread-4k-qd32)  rw=randread bs=4k qd=32 ;;
    randwrite-4k-qd32) rw=randwrite bs=4k qd=32 ;;
    read-1m-qd8)       rw=read bs=1M qd=8 ;;
    write-1m-qd8)      rw=write bs=1M qd=8 ;;
  esac
  [ -n "$LIMIT" ] && size=(--size="$LIMIT")
  [ "$COLD" = 1 ] && drop_page_cache
  fio --name=pair --ioengine=nbd --uri="$uri" --rw=$rw --bs=$bs --iodepth=$qd "${size[@]}" --time_based \
      --runtime="$RUNTIME" --eta=never --output-format=json --output="$WORK/run.json" >/dev/null 2>&1 \
    || die "fio against $2 failed"
  python3 -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]; print(round(j[sys.argv[2]]["iops"]))' \
    "$WORK/run.json" "$(is_write "$1" && echo write || echo read)"
}

side() {  # side a|b FORMAT MODE JOB -> prints one figure; starts and stops that side's own server (own_server)
  local sock=$SOCK_A value
  [ "$1" = b ] && sock=$SOCK_B
  if own_server "$4"; then start_servers "$2" "$3" "$1"; fi
  value=$(measure "$4" "$sock")
  if own_server "$4"; then stop_servers; fi
  echo "$value"
}

RESULTS=$WORK/pairs.tsv
printf 'format\tmode\tjob\tpair\t%s\t%s\n' "$NAME_A" "$NAME_B" >"$RESULTS"
for fmt in "${FORMAT_LIST[@]}"; do
  for mode in "${MODE_LIST[@]}"; do
    for job in "${JOB_LIST[@]}"; do
      own_server "$job" || start_servers "$fmt" "$mode"
      log "$fmt $mode $job: $PAIRS pairs"
      side a "$fmt" "$mode" "$job" >/dev/null; side b "$fmt" "$mode" "$job" >/dev/null  # warm-up, not counted
      for ((pair = 1; pair <= PAIRS; pair++)); do
        if ((pair % 4 == 1 || pair % 4 == 0)); then   # ABBA: a b, b a, b a, a b, ...
          a=$(side a "$fmt" "$mode" "$job"); b=$(side b "$fmt" "$mode" "$job")
        else
          b=$(side b "$fmt" "$mode" "$job"); a=$(side a "$fmt" "$mode" "$job")
        fi
        [[ "$a" =~ ^[0-9]+$ && "$b" =~ ^[0-9]+$ ]] || die "$fmt $mode $job pair $pair: no figure ($NAME_A '$a', $NAME_B '$b')"
        printf '%s\t%s\t%s\t%d\t%s\t%s\n' "$fmt" "$mode" "$job" "$pair" "$a" "$b" >>"$RESULTS"
      done
      stop_servers
    done
  done
done
for job in "${JOB_LIST[@]}"; do is_write "$job" && WROTE=1; done
if [ -n "${WROTE:-}" ] || [ "$AGAINST" = raw ]; then
  for fmt in "${FORMAT_LIST[@]}"; do
    [ "$fmt" = qcow2 ] || continue
    qemu-img check -q "$WORK/image.qcow2" || die "qemu-img check of the written qcow2 failed (exit $?)"
    log "qemu-img check of image.qcow2 after the pairs: clean"
  done
fi

python3 - "$RESULTS" <<'PY'
import csv, random, statistics as st, sys
reader = csv.reader(open(sys.argv[1]), delimiter="\t")
a_name, b_name = next(reader)[4:6]
rows = {}
for fmt, mode, job, _, a, b in reader:
    rows.setdefault((fmt, mode, job), []).append((int(a), int(b)))
shown = {"strata": "Strata", "qemu_nbd": "qemu-nbd"}
a_name, b_name = shown.get(a_name, a_name), shown.get(b_name, b_name)
print(f"{'row':36} {a_name:>8} {b_name:>9}  {'paired ratio':>12}  {'95% interval':>13}  wins")
for (fmt, mode, job), pairs in rows.items():
    ratios = [s / q for s, q in pairs]
    random.seed(0)
    boot = sorted(st.median(random.choices(ratios, k=len(ratios))) for _ in range(2000))
    unit = "MiB/s" if job in ("nbdcopy", "read-1m-qd8", "write-1m-qd8") else "IOPS"  # 1 MiB per I/O
    print(f"{fmt + ' ' + mode + ' ' + job + ' (' + unit + ')':36} {st.median(s for s, _ in pairs):>8.0f} "
          f"{st.median(q for _, q in pairs):>9.0f}  {st.median(ratios):>11.3f}x  {boot[50]:>5.3f}-{boot[1949]:.3f}  "
          f"{sum(r > 1 for r in ratios)}/{len(ratios)}")
PY
echo "pairs: $RESULTS"
