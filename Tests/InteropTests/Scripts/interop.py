#!/usr/bin/python3
"""Strata interop test runner.

Usage:
  interop.py --list                      one case name per line
  interop.py --server-cmd "qemu-nbd" --case NAME [--qemu-quirks] [-v]
  interop.py --server-cmd "/path/to/strata serve" --all [-j 2]

--all runs every case in its own subprocess and ends with
"N passed, N failed".  --qemu-quirks accepts the documented qemu-nbd
deviations below.  -v logs every command.  A case still running after
INTEROP_CASE_TIMEOUT seconds (default 120) fails and is cleaned up.
Lines starting with "note:" record behaviour (errno chosen, etc.).

--server-cmd is split like a shell command line; the runner appends qemu-nbd
style options and the image path, e.g.
  -k SOCK -f raw -t [-r] [-e N] [-x NAME] [-D DESC] [--discard=unmap]
  [--detect-zeroes=...] [-A] [--cache=none --aio=native] IMAGE
Each case makes its own temp dir under /tmp, starts its own servers and always
stops them and removes the dir.  Exit status 0 = pass, 1 = fail, 2 = error in
the case itself, 3 = usage error.  Cases are independent and may run in
parallel.  Needs Debian's /usr/bin/python3 (the only one with `import nbd`).

Developed against qemu-nbd 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18), libnbd
1.14.2.  The cases follow the NBD protocol (doc/proto.md of
NetworkBlockDevice/nbd) where qemu-nbd does not.

KNOWN qemu-nbd 7.2 DEVIATIONS FROM THE NBD SPEC
-----------------------------------------------
Cases fail against qemu-nbd on exactly these points; --qemu-quirks accepts
qemu's answer instead (and prints a note), so the rest of each case can still
be validated against qemu-nbd.  Strata should follow the spec.

QEMU-EPERM   Write / trim / write-zeroes on a read-only (-r) export: qemu-nbd
             replies EINVAL ("Export is read-only").  Spec: the server SHOULD
             return EPERM for a write or trim on a read-only export.  (qemu
             reports every error found while validating a request as EINVAL:
             nbd_co_receive_request() computes EROFS/ENOSPC but nbd_trip()
             sends EINVAL.)  Fails: negative_commands, read_only_flags.

Where the spec allows several answers the cases accept all of them and print
a "note:" line with the one seen:
  * write / write-zeroes past the end: ENOSPC (spec SHOULD) or EINVAL
    (qemu-nbd's choice); trim past the end: EINVAL or ENOSPC.
  * read over the 32 MiB maximum: EINVAL (qemu) or EOVERFLOW.
  * FAST_ZERO: success (qemu) or ENOTSUP.

CHECKS THAT PIN qemu-nbd BEHAVIOUR BEYOND THE SPEC (drop-in replacement)
  * Advertised block sizes 1 / 4096 / 33554432 (nbdinfo and
    NBD_INFO_BLOCK_SIZE), and reads over 32 MiB refused.
  * Holes are read back as NBD_REPLY_TYPE_OFFSET_HOLE chunks (READ_HOLE);
    block status reports data 0 / holes 3 at the file's SEEK_HOLE layout.
  * Default --discard=ignore: a trim leaves the data in place
    (qemu_io_compare); --discard=unmap + --detect-zeroes=unmap turn discard,
    write-zeroes with unmap and written zero data into holes.
  * Export names are strict: with -x foo, "bar" and "" are refused
    (NBD_REP_ERR_UNKNOWN for GO, hard close for EXPORT_NAME).
  * -A offers qemu:allocation-depth; -e 4 advertises multi-conn.
  * Without -t: exit status 0 right after the only client disconnects.

BEHAVIOUR RECORDED FROM qemu-nbd 7.2
  * nbdinfo --json, writable raw export: protocol "newstyle-fixed",
    structured true, contexts ["base:allocation"] (plus
    "qemu:allocation-depth" with -A), is_rotational false, is_read_only
    false, can_cache/can_df/can_fast_zero/can_flush/can_fua/can_trim/can_zero
    true, can_multi_conn false (true with -e N>1), block_size_minimum 1,
    block_size_preferred 4096, block_size_maximum 33554432 (same with
    --cache=none).  With -r: is_read_only true, can_trim/can_zero/
    can_fast_zero false, can_flush/can_fua/can_cache/can_df still true.
    With -x NAME -D DESC: "export-name": NAME, "description": DESC.
  * Transmission flags: 0x0c6d without structured replies (HAS_FLAGS,
    FLUSH, FUA, TRIM, WRITE_ZEROES, CACHE, FAST_ZERO), 0x0ced with them
    (+ SEND_DF).  NBD_INFO_NAME is sent when requested.
  * nbdinfo --map=qemu:allocation-depth with -A on a raw file: a single
    extent {offset 0, length SIZE, type 1, "local"}, holes included.
  * errno choices (all keep the connection usable): read past end, at end,
    at 2^62 -> EINVAL; write / write-zeroes past end -> EINVAL; trim, cache,
    block status past end -> EINVAL; read of 32 MiB + 4 KiB -> EINVAL
    (exactly 32 MiB is fine); block status without a negotiated meta
    context -> EINVAL; unknown command 42 -> EINVAL; flags not valid for the
    command (REQ_ONE/NO_HOLE/bit 10/bit 15 on read, NO_HOLE/DF/FAST_ZERO on
    write, NO_HOLE/FAST_ZERO on trim, DF/REQ_ONE on write-zeroes, DF on block
    status, REQ_ONE on cache, NO_HOLE on flush) -> EINVAL; DF on read without
    structured replies (flag not advertised) -> EINVAL.  Recorded only:
    read/write/zero/trim of length 0 -> success, block status of length 0
    -> EINVAL; FUA on read, flush and block status -> accepted (spec: FUA
    is valid on any command once NBD_FLAG_SEND_FUA is advertised).  With
    structured replies a failed read gets a structured error chunk.
  * Handshake: unknown client flags (incl. garbage) -> hard close, nothing
    sent; option with bad magic -> close; option length 0xFFFFFFF0 -> close
    at once ("larger than max len"); NBD_OPT_EXPORT_NAME with a 5000-byte
    or unknown name -> close, nothing sent; NBD_OPT_GO whose name length
    exceeds the option length -> NBD_REP_ERR_INVALID, usable; unknown option
    -> NBD_REP_ERR_UNSUP ("Unsupported option 16962"), usable, even with a
    64 KiB payload; NBD_OPT_LIST with payload -> NBD_REP_ERR_INVALID;
    NBD_OPT_STRUCTURED_REPLY with payload -> NBD_REP_ERR_INVALID;
    NBD_OPT_STARTTLS without TLS -> NBD_REP_ERR_POLICY; NBD_OPT_ABORT ->
    NBD_REP_ACK then close; NBD_OPT_GO for an unknown export ->
    NBD_REP_ERR_UNKNOWN; a request with bad magic -> a simple EINVAL reply
    (with the garbage request's handle), then close.
  * write -z -u over data with the default --discard=ignore still reads
    back as a hole on ext4 (qemu uses fallocate ZERO_RANGE); recorded only.
"""

import argparse
import os
import shlex
import subprocess
import sys
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True  # leave no __pycache__ next to the scripts

try:
    import nbd  # noqa: F401  (python3-libnbd)
except ImportError:
    sys.stderr.write("interop.py: cannot import the nbd module; run it with"
                     " Debian's /usr/bin/python3 (package python3-libnbd)\n")
    sys.exit(3)

from common import CASE_TIMEOUTS, CASES, CaseFailure, Context, Options  # noqa: E402

# Registration order = --list order.
import cases_nbdinfo  # noqa: E402,F401
import cases_qcow2  # noqa: E402,F401
import cases_qcow2_write  # noqa: E402,F401
import cases_qcow2_write_edges  # noqa: E402,F401
import cases_copy  # noqa: E402,F401
import cases_libnbd  # noqa: E402,F401
import cases_handshake  # noqa: E402,F401

# A case that takes longer than this is a failure (hung server or client).
CASE_TIMEOUT = int(os.environ.get("INTEROP_CASE_TIMEOUT", "120"))


_result_lock = threading.Lock()


def _watchdog(name, ctx, done):
    """Ends a hung case: libnbd calls have no timeout of their own, and a
    signal cannot interrupt them, so after CASE_TIMEOUT report, stop the
    servers, clean up and exit.  Holding _result_lock keeps the main thread
    (whose blocked calls now fail) from printing a second verdict."""
    limit = max(CASE_TIMEOUT, CASE_TIMEOUTS.get(name, 0))
    if done.wait(limit):
        return
    _result_lock.acquire()
    if done.is_set():
        _result_lock.release()
        return
    print("FAIL %s: case did not finish within %d s (hung server or client)"
          % (name, limit))
    print(ctx.server_stderr_report())
    sys.stdout.flush()
    ctx.close()
    os._exit(1)


def run_case(name):
    fn = CASES[name]
    t0 = time.monotonic()
    ctx = Context(name)
    done = threading.Event()
    threading.Thread(target=_watchdog, args=(name, ctx, done),
                     daemon=True).start()
    status, report = 0, ""
    try:
        try:
            fn(ctx)
        except CaseFailure as e:
            status, report = 1, "FAIL %s: %s" % (name, e)
        except Exception:
            status = 2
            report = ("ERROR %s: unexpected exception in the case:\n%s"
                      % (name, traceback.format_exc().rstrip()))
        with _result_lock:
            done.set()
            if status == 0:
                print("PASS %s (%.1f s)" % (name, time.monotonic() - t0))
            else:
                print(report)
                print(ctx.server_stderr_report())
            sys.stdout.flush()
    finally:
        done.set()
        ctx.close()  # always: stop the servers, remove the temp dir
    return status


def run_all(args):
    """Run every case in its own subprocess, ``-j`` at a time."""
    names = list(CASES)
    base = [sys.executable, os.path.abspath(__file__), "--server-cmd",
            args.server_cmd]
    if args.qemu_quirks:
        base.append("--qemu-quirks")
    if args.verbose:
        base.append("--verbose")
    pending = list(names)
    running = {}
    results = {}
    t0 = time.monotonic()
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            p = subprocess.Popen(base + ["--case", name],
                                 stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT)
            running[name] = (p, time.monotonic())
        for name, (p, started) in list(running.items()):
            if p.poll() is None:
                if time.monotonic() - started > max(CASE_TIMEOUT, CASE_TIMEOUTS.get(name, 0)) + 30:
                    p.kill()
                continue
            out = p.stdout.read().decode("utf-8", "replace")
            p.stdout.close()
            del running[name]
            results[name] = p.returncode
            sys.stdout.write(out)
            sys.stdout.flush()
        time.sleep(0.05)
    passed = [n for n in names if results[n] == 0]
    failed = [n for n in names if results[n] != 0]
    print("")
    print("total %.1f s; failed: %s" % (time.monotonic() - t0,
                                        " ".join(failed) or "none"))
    print("%d passed, %d failed" % (len(passed), len(failed)))
    return 0 if not failed else 1


def main():
    ap = argparse.ArgumentParser(
        description="NBD interop cases for Strata (qemu-nbd compatible).")
    ap.add_argument("--list", action="store_true", help="print case names")
    ap.add_argument("--server-cmd", default="qemu-nbd",
                    help="server command prefix (shell-split)")
    ap.add_argument("--case", help="run one case")
    ap.add_argument("--all", action="store_true", help="run every case")
    ap.add_argument("-j", "--jobs", type=int, default=1,
                    help="parallel cases with --all")
    ap.add_argument("--qemu-quirks", action="store_true",
                    help="accept qemu-nbd 7.2's documented spec deviations")
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="log commands and server start-up")
    args = ap.parse_args()

    if args.list:
        for name in CASES:
            print(name)
        return 0
    Options.server_cmd = shlex.split(args.server_cmd)
    Options.qemu_quirks = args.qemu_quirks
    Options.verbose = args.verbose
    if not Options.server_cmd:
        ap.error("--server-cmd is empty")
    if args.all:
        return run_all(args)
    if not args.case:
        ap.error("give --list, --case NAME or --all")
    if args.case not in CASES:
        print("unknown case %r; known cases:\n  %s"
              % (args.case, "\n  ".join(CASES)), file=sys.stderr)
        return 3
    return run_case(args.case)


if __name__ == "__main__":
    sys.exit(main())
