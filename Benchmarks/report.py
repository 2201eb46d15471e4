#!/usr/bin/env python3
"""The tables of a Benchmarks/run.sh work dir.

Reads WORK/meta.txt, results.tsv, device.tsv and checks.tsv (written by
run.sh while it measures), writes WORK/report.txt and prints it. run.sh
calls it at the end of a run and for `run.sh --report WORK`; it can also be
run alone: `python3 Benchmarks/report.py WORK`.
"""
import sys, os, csv

work = sys.argv[1]
meta = {}
with open(os.path.join(work, "meta.txt")) as f:
    for line in f:
        if "=" in line:
            k, v = line.rstrip("\n").split("=", 1)
            meta[k] = v

import statistics

EXPECTED_ROUNDS = int(meta.get("rounds") or 1)   # work dirs from before --rounds: one
runs = {}   # (format, server, job, phase) -> {round: row of results.tsv}
with open(os.path.join(work, "results.tsv")) as f:
    for r in csv.DictReader(f, delimiter="\t"):
        fmt = r.get("format") or "raw"     # work dirs from before --formats: raw only
        rnd = int(r.get("round") or 1)     # work dirs from before --rounds: one round
        runs.setdefault((fmt, r["server"], r["job"], r["phase"]), {})[rnd] = r

def median_row(by_round):
    """One row for a cell: the median value and CPU over its rounds. A cell
    with a failed round shows that round's status, and one with a round
    missing (a server that died skips its remaining jobs) shows that, so
    no failure hides behind a median."""
    rs = [by_round[k] for k in sorted(by_round)]
    bad = [r for r in rs if r["status"] != "ok"]
    if bad:
        return bad[0]
    if len(rs) < EXPECTED_ROUNDS:
        return dict(rs[0], status="missing-round")
    out = dict(rs[0])
    for key in ("value", "cpu_us_per_req"):
        vals = [num(r, key) for r in rs]
        out[key] = "n/a" if None in vals else str(statistics.median(vals))
    return out

rows = {}   # (format, server, job, phase) -> the cell's median row

checks = []  # rows of checks.tsv: qemu-img check after each qcow2 server
cpath = os.path.join(work, "checks.tsv")
if os.path.exists(cpath):
    with open(cpath) as f:
        checks = list(csv.DictReader(f, delimiter="\t"))

JOBS = ["randread-4k-qd1", "randread-4k-qd32", "randwrite-4k-qd32",
        "read-1m-qd8", "write-1m-qd8", "nbdcopy"]
UNIT = {"randread-4k-qd1": "IOPS", "randread-4k-qd32": "IOPS",
        "randwrite-4k-qd32": "IOPS", "read-1m-qd8": "MiB/s",
        "write-1m-qd8": "MiB/s", "nbdcopy": "MiB/s"}
PHASES = ["cold", "warm", "fresh"]
# format -> list of (title, servers, strata server)
QMODES = lambda what: [
    (f"{what} / O_DIRECT mode: -f qcow2 --cache=none --aio=native",
     ["strata-none", "qemu-nbd-none"], "strata-none"),
    (f"{what} / Defaults mode: -f qcow2, no cache/aio options",
     ["strata", "qemu-nbd"], "strata"),
]
SECTIONS = [
    ("raw", [
        ("O_DIRECT mode: --cache=none --aio=native "
         "(disk = fio libaio --direct=1 on served.img, no NBD)",
         ["strata-none", "qemu-nbd-none", "disk"], "strata-none"),
        ("Defaults mode: no cache/aio options "
         "(nbdkit-null = protocol ceiling, read jobs only)",
         ["strata", "qemu-nbd", "nbdkit-file", "nbdkit-null"], "strata"),
    ]),
    ("qcow2", QMODES("qcow2 (fully allocated, converted from the raw image)")),
    ("chain", QMODES("chain (overlay: every other 1 MiB, base: whole image)")),
    ("alloc", QMODES("alloc (4k randwrite QD32 into an empty qcow2, fresh per server)")),
]

def num(r, key):
    try:
        return float(r[key])
    except (KeyError, TypeError, ValueError):
        return None

def ok(r):
    return r is not None and r["status"] == "ok"

for key, by_round in runs.items():
    rows[key] = median_row(by_round)
ROUNDS = max([EXPECTED_ROUNDS] + [max(v) for v in runs.values()])

def round_ratios(a_key, b_key):
    """The rounds' own ratios of a to b (rounds where both ran and are ok)."""
    a, b = runs.get(a_key, {}), runs.get(b_key, {})
    out = []
    for rnd in sorted(set(a) & set(b)):
        if ok(a[rnd]) and ok(b[rnd]):
            va, vb = num(a[rnd], "value"), num(b[rnd], "value")
            if va is not None and vb:
                out.append(va / vb)
    return out

def fmt_val(v, unit):
    if v is None:
        return "-"
    return f"{v:,.0f}" if unit == "IOPS" else f"{v:,.1f}"

def cell(fmt, server, job, phase):
    r = rows.get((fmt, server, job, phase))
    if r is None:
        return "-", "-"
    if r["status"] != "ok":
        return "ERR", "ERR"
    v = fmt_val(num(r, "value"), r["unit"])
    us = num(r, "cpu_us_per_req")
    u = "n/a" if us is None else f"{us:.1f}"
    return v, u

out = []
p = out.append
p(f"Strata NBD benchmark  {meta.get('date','')}")
p(f"host: {meta.get('host','')}  cpus: {meta.get('cpus','')}  kernel: {meta.get('kernel','')}")
p(f"image: {meta.get('size','')} ({meta.get('bytes','')} bytes) on {meta.get('fstype','')}  "
  f"runtime: {meta.get('runtime','')} s/job  load at start: {meta.get('load','')}")
p(f"tools: {meta.get('versions','')}")
if meta.get("peers_first") == "1":
    p("order: peers first, Strata last in every row set (--peers-first)" if ROUNDS == 1 else
      "order: peers first in odd rounds, Strata first in even rounds (--peers-first)")
if meta.get("job_major") == "1":
    p("order: job by job; every server runs a job (on a freshly restored file, freshly started), "
      "then the next job begins with the server order reversed")
if ROUNDS > 1:
    order = ("each running every row set, the row sets and the servers in reverse order in even rounds"
             if meta.get("interleaved") == "1" else   # work dirs from before: each row set's rounds in a row
             "the server order reversed in each round after the first")
    p(f"rounds: {ROUNDS}, {order}; every cell is "
      "the median over the rounds (ERR if any round failed or is missing), every perf ratio the "
      "ratio of medians with the range of the rounds' own ratios in brackets")
if meta.get("pin"):
    p(f"pinned: every server and its client ran on CPU {meta['pin']} only (--pin)")
if meta.get("formats"):
    p(f"row sets: {meta['formats']}" + (f"  --only: {meta['only']}" if meta.get("only") else ""))
if meta.get("drop_ok") != "1":
    p("NOTE: page cache could NOT be dropped (not root?): 'cold' rows are not cold.")
for note in meta.get("notes", "").split("|"):
    if note:
        p("NOTE: " + note)
p("")
p("value = IOPS for 4k jobs, MiB/s for 1M jobs and nbdcopy (higher is better)")
p("µs/req = server CPU (utime+stime, all threads) per request (lower is better); "
  f"tick = {1e6/float(meta.get('clk_tck','100')):.0f} µs, so small counts are coarse")
p("nbdcopy = median of NBDCOPY_RUNS copies (each cold one after its own cache drop); "
  "requests = image size / 256 KiB (its --request-size) per copy; "
  "cold = page cache dropped right before the job, warm = same job repeated at once")
present_fmts = {k[0] for k in rows}
p(("every raw and qcow2 server serves one file, served.img (chain and alloc: one each), "
   if meta.get("interleaved") == "1" else "every server serves one file, served.img, ")
  + "restored in place from its row set's image and read once "
  "(O_DIRECT) before it starts, not timed: same blocks, same host cache for all")
if present_fmts - {"raw"}:
    p(("qcow2 row sets: every job starts from the row set's image. " if meta.get("job_major") == "1" else
       "qcow2 row sets: read jobs run before write jobs. ") + "alloc: one pass at most, "
      "fresh = new empty image, cache dropped")

def section(fmt, title, servers, strata):
    present = {k[1] for k in rows if k[0] == fmt}
    servers = [s for s in servers if s in present]
    p("")
    p("== " + title + " ==")
    if not servers:
        p("(nothing run in this mode)")
        return
    w = 12
    hdr1 = f"{'':<18} {'':<5} {'':<6}"
    hdr2 = f"{'job':<18} {'phase':<5} {'unit':<6}"
    for s in servers:
        hdr1 += f" | {s:^{2*w+1}}"
        hdr2 += f" | {'value':>{w}} {'µs/req':>{w}}"
    p(hdr1)
    p(hdr2)
    p("-" * len(hdr2))
    for job in JOBS:
        for ph in PHASES:
            if not any((fmt, s, job, ph) in rows for s in servers):
                continue
            line = f"{job:<18} {ph:<5} {UNIT[job]:<6}"
            for s in servers:
                v, u = cell(fmt, s, job, ph)
                line += f" | {v:>{w}} {u:>{w}}"
            p(line)

    ratios(fmt, servers, strata)
    if fmt == "qcow2":
        raw_share(servers, strata)

def ratios(fmt, servers, strata):
    peers = [s for s in servers if s != strata]
    p("")
    if strata not in servers:
        p(f"Strata ratios: skipped ({strata} was not run)")
        return
    if not peers:
        p("Strata ratios: skipped (no peer was run in this mode)")
        return
    p(f"Strata ratios ({strata} / peer): perf >1 = Strata faster; cpu <1 = Strata uses less CPU per request")
    hdr = f"{'job':<18} {'phase':<5}"
    for s in peers:
        hdr += f" | {('vs ' + s + ' perf'):>22} {'cpu':>6}"
    p(hdr)
    p("-" * len(hdr))
    for job in JOBS:
        for ph in PHASES:
            a = rows.get((fmt, strata, job, ph))
            if a is None:
                continue
            line = f"{job:<18} {ph:<5}"
            for s in peers:
                b = rows.get((fmt, s, job, ph))
                perf = cpu = "-"
                if ok(a) and ok(b):
                    va, vb = num(a, "value"), num(b, "value")
                    if va is not None and vb:
                        perf = f"{va / vb:.2f}x"
                        spread = round_ratios((fmt, strata, job, ph), (fmt, s, job, ph))
                        if len(spread) > 1:
                            perf += f" ({min(spread):.2f}-{max(spread):.2f})"
                    ca, cb = num(a, "cpu_us_per_req"), num(b, "cpu_us_per_req")
                    if ca is not None and cb:
                        cpu = f"{ca / cb:.2f}x"
                line += f" | {perf:>22} {cpu:>6}"
            p(line)
    if fmt == "raw" and strata == "strata-none":
        for ph in ("cold", "warm"):
            a = rows.get(("raw", "strata-none", "randread-4k-qd32", ph))
            b = rows.get(("raw", "disk", "randread-4k-qd32", ph))
            if ok(a) and ok(b) and num(b, "value"):
                pct = 100.0 * num(a, "value") / num(b, "value")
                p(f"Strata O_DIRECT randread-4k-qd32 ({ph}): {pct:.1f}% of disk "
                  f"({num(a,'value'):,.0f} vs {num(b,'value'):,.0f} IOPS)")

def raw_share(servers, strata):
    # The cost of the qcow2 layer: each server's qcow2 row as a % of its
    # own raw row (same data, same blocks of the disk, same mode).
    peer = "qemu-nbd-none" if strata == "strata-none" else "qemu-nbd"
    pair = [s for s in (strata, peer) if s in servers]
    has_raw = any(k[0] == "raw" and k[1] in pair for k in rows)
    if len(pair) < 2 and not has_raw:
        return   # a lone server and no raw rows: nothing to show, not even "n/a"
    p("")
    p("qcow2 as a % of raw (same data, same served file, same server and mode)"
      + (": median of qcow2 over median of raw, the rounds' own range in brackets" if ROUNDS > 1 else ":"))
    width = 22 if ROUNDS > 1 else 14
    hdr = f"{'job':<18} {'phase':<5}" + "".join(f" | {s:>{width}}" for s in pair)
    p(hdr)
    p("-" * len(hdr))
    shown = False
    for job in JOBS:
        for ph in PHASES:
            cells = []
            for s in pair:
                a, b = rows.get(("qcow2", s, job, ph)), rows.get(("raw", s, job, ph))
                if ok(a) and ok(b) and num(a, "value") is not None and num(b, "value"):
                    pct = f"{100.0 * num(a, 'value') / num(b, 'value'):.1f}%"
                    spread = round_ratios(("qcow2", s, job, ph), ("raw", s, job, ph))
                    if len(spread) > 1:
                        pct += f" ({100 * min(spread):.0f}-{100 * max(spread):.0f})"
                    cells.append(pct)
                else:
                    cells.append("-")
            if any(c != "-" for c in cells):
                shown = True
                p(f"{job:<18} {ph:<5}" + "".join(f" | {c:>{width}}" for c in cells))
    if not shown:
        p("n/a: needs the same server's rows in both row sets (--formats raw,qcow2)")

for fmt, modes in SECTIONS:
    if fmt not in present_fmts:
        continue
    for title, servers, strata in modes:
        section(fmt, title, servers, strata)

# The device's own time per I/O (guest /proc/diskstats) in the O_DIRECT
# 4k jobs, where the disk sets the pace: a server's slow row with a slow
# device is the disk's doing (another tenant, the host's cache), not the
# server's.
device = {}  # (format, server, job, phase) -> [µs per I/O, one per round]
dpath = os.path.join(work, "device.tsv")
if os.path.exists(dpath):
    with open(dpath) as f:
        for r in csv.DictReader(f, delimiter="\t"):
            if r["mode"] != "odirect" or "-4k-" not in r["job"]:
                continue
            key = "write_us_per_io" if "write" in r["job"] else "read_us_per_io"
            try:
                device.setdefault((r["format"], r["server"], r["job"], r["phase"]), []).append(float(r[key]))
            except ValueError:
                pass
if device:
    servers = sorted({k[1] for k in device})
    p("")
    p("== Device time per I/O in the O_DIRECT 4k jobs (µs, /proc/diskstats; median over rounds, range in brackets) ==")
    p(f"{'row set':<7} {'job':<18} {'phase':<5}" + "".join(f" | {s:>22}" for s in servers))
    for fmt in [f for f, _ in SECTIONS]:
        for job in JOBS:
            for ph in PHASES:
                cells = []
                for s in servers:
                    v = device.get((fmt, s, job, ph))
                    if not v:
                        cells.append("-")
                    elif len(v) > 1:
                        cells.append(f"{statistics.median(v):.0f} ({min(v):.0f}-{max(v):.0f})")
                    else:
                        cells.append(f"{v[0]:.0f}")
                if any(c != "-" for c in cells):
                    p(f"{fmt:<7} {job:<18} {ph:<5}" + "".join(f" | {c:>22}" for c in cells))

if checks:
    p("")
    p("== qemu-img check of each server's qcow2 after its jobs (exit 0 = clean) ==")
    width = 40 if any(c.get("job") for c in checks) else 22   # job-major runs check after every job
    if meta.get("interleaved") == "1":   # rounds mix the row sets: list them apart
        fmt_rank = [f for f, _ in SECTIONS]
        checks.sort(key=lambda c: fmt_rank.index(c["format"]) if c["format"] in fmt_rank else len(fmt_rank))
    for c in checks:
        alloc = ""
        try:
            a, t = int(c["allocated"]), int(c["total"])
            alloc = f"  {a}/{t} clusters allocated ({100.0 * a / t:.1f}%)"
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            pass
        verdict = "ok" if c["rc"] == "0" and c.get("note", "") == "" else "FAILED"
        extra = f"  {c['note']}" if c.get("note") else ""
        name = c['format'] + '/' + c['server']
        if c.get("job"):
            name += " " + c["job"]
        if ROUNDS > 1:
            name += f" (round {c.get('round') or 1})"
        p(f"{name:<{width + 10 if ROUNDS > 1 else width}} exit {c['rc']}: {verdict}{alloc}{extra}")

text = "\n".join(out) + "\n"
with open(os.path.join(work, "report.txt"), "w") as f:
    f.write(text)
sys.stdout.write(text)
