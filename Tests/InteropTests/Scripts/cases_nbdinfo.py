"""Cases driven by nbdinfo (libnbd-bin): export metadata, listing, maps,
export names and the server lifetime options."""

import json
import time

import nbd

from common import (STD_EXTENTS, STD_SIZE, case, check, check_bytes, check_eq, check_in, pattern,
                    expected_map, fail, make_sparse_image, merge_extents,
                    note)

# What `nbdinfo --json` must say for a writable raw export.
WRITABLE_FLAGS = {
    "is_read_only": False,
    "can_flush": True,
    "can_fua": True,
    "can_trim": True,
    "can_zero": True,
    "can_cache": True,
}
BLOCK_SIZES = {
    "block_size_minimum": 1,
    "block_size_preferred": 4096,
    "block_size_maximum": 33554432,
}
# Recorded (not asserted) fields; qemu-nbd 7.2 values are in the header of
# interop.py.
RECORDED_FIELDS = ("can_df", "can_fast_zero", "can_multi_conn", "is_rotational",
                   "contexts")


def info_json(ctx, uri, extra=()):
    res = ctx.run(["nbdinfo", "--json", *extra, uri], timeout=20,
                  what="nbdinfo --json")
    try:
        return json.loads(res.out)
    except ValueError as e:
        fail("nbdinfo --json printed invalid JSON (%s):\n%s" % (e, res.out))


def only_export(info):
    exports = info.get("exports") or []
    check(len(exports) == 1,
          "expected exactly one export in nbdinfo output, saw %d:\n%s"
          % (len(exports), json.dumps(info, indent=1)))
    return exports[0]


def check_fields(what, export, expected):
    for key, want in expected.items():
        check_eq("%s: nbdinfo field %r" % (what, key), want, export.get(key))


@case
def nbdinfo_json(ctx):
    """`nbdinfo --json` reports the right size, export name, read-only flag,
    command support flags and block sizes; -r flips is_read_only; -x/-D
    publish the export name and description."""
    img = ctx.path("disk.raw")
    make_sparse_image(img, STD_SIZE, STD_EXTENTS)

    # 1. Default export, writable.
    srv = ctx.start_server(img)
    info = info_json(ctx, srv.uri())
    check_eq("protocol", "newstyle-fixed", info.get("protocol"))
    check_eq("structured replies negotiated", True, info.get("structured"))
    exp = only_export(info)
    check_eq("export-size", STD_SIZE, exp.get("export-size"))
    check_eq("export-name", "", exp.get("export-name"))
    check_fields("writable export", exp, WRITABLE_FLAGS)
    check_fields("writable export", exp, BLOCK_SIZES)
    check("base:allocation" in (exp.get("contexts") or []),
          "expected meta context base:allocation in %r" % exp.get("contexts"))
    note("writable export also reports "
         + ", ".join("%s=%s" % (k, json.dumps(exp.get(k))) for k in RECORDED_FIELDS))
    srv.stop()

    # 2. Read-only export.
    srv = ctx.start_server(img, readonly=True)
    exp = only_export(info_json(ctx, srv.uri()))
    check_eq("-r: is_read_only", True, exp.get("is_read_only"))
    check_eq("-r: export-size", STD_SIZE, exp.get("export-size"))
    check_fields("-r export", exp, BLOCK_SIZES)
    note("-r export reports "
         + ", ".join("%s=%s" % (k, json.dumps(exp.get(k)))
                     for k in ("can_flush", "can_fua", "can_trim", "can_zero",
                               "can_cache", "can_fast_zero", "can_multi_conn")))
    srv.stop()

    # 3. Named export with a description.
    srv = ctx.start_server(img, name="vol-one", desc="Strata interop disk")
    exp = only_export(info_json(ctx, srv.uri("vol-one")))
    check_eq("-x: export-name", "vol-one", exp.get("export-name"))
    check_eq("-D: description", "Strata interop disk", exp.get("description"))
    check_eq("-x: export-size", STD_SIZE, exp.get("export-size"))
    check_fields("named export", exp, WRITABLE_FLAGS)


@case
def nbdinfo_list(ctx):
    """`nbdinfo --list` (NBD_OPT_LIST + NBD_OPT_INFO) shows the export named
    with -x and its -D description, in both text and JSON output."""
    img = ctx.path("disk.raw")
    make_sparse_image(img, STD_SIZE, STD_EXTENTS)
    srv = ctx.start_server(img, name="listed", desc="the listed export")

    info = info_json(ctx, srv.uri(), extra=("--list",))
    exports = info.get("exports") or []
    names = [e.get("export-name") for e in exports]
    check_eq("exports listed by nbdinfo --list --json", ["listed"], names)
    check_eq("description in nbdinfo --list --json", "the listed export",
             exports[0].get("description"))
    check_eq("export-size in nbdinfo --list --json", STD_SIZE,
             exports[0].get("export-size"))

    text = ctx.run(["nbdinfo", "--list", srv.uri()], timeout=20,
                   what="nbdinfo --list").out
    for want in ('export="listed":', "description: the listed export"):
        check(want in text, "expected %r in `nbdinfo --list` output:\n%s"
              % (want, text))


def map_json(ctx, uri, context=None):
    args = ["nbdinfo", "--json"]
    args.append("--map" if context is None else "--map=" + context)
    res = ctx.run(args + [uri], timeout=20, what="nbdinfo --map")
    try:
        entries = json.loads(res.out)
    except ValueError as e:
        fail("nbdinfo --map --json printed invalid JSON (%s):\n%s" % (e, res.out))
    return [(e["offset"], e["length"], e["type"]) for e in entries], entries


@case
def nbdinfo_map(ctx):
    """`nbdinfo --map` (base:allocation block status) of a sparse raw image
    matches how the file was built: data extents type 0, holes type 3
    (hole|zero).  With -A, qemu:allocation-depth is offered and reports
    depth 1 ("local") for the whole raw image, holes included."""
    img = ctx.path("disk.raw")
    make_sparse_image(img, STD_SIZE, STD_EXTENTS)
    want = expected_map(STD_SIZE, STD_EXTENTS)

    srv = ctx.start_server(img)
    seen, _ = map_json(ctx, srv.uri())
    check_eq("base:allocation map (offset, length, type), adjacent equal"
             " extents merged", want, merge_extents(seen))
    srv.stop()

    # -A: qemu-nbd 7.2 prints, for a raw file, one extent covering the whole
    # image: {"offset": 0, "length": SIZE, "type": 1, "description": "local"}
    # (text form: "0  SIZE  1  local").  Raw has no backing chain, so every
    # byte, hole or not, is allocated at depth 1.
    srv = ctx.start_server(img, allocation_depth=True)
    exp = only_export(info_json(ctx, srv.uri()))
    check("qemu:allocation-depth" in (exp.get("contexts") or []),
          "with -A expected meta context qemu:allocation-depth, saw %r"
          % exp.get("contexts"))
    seen, raw = map_json(ctx, srv.uri(), "qemu:allocation-depth")
    check_eq("qemu:allocation-depth map with -A", [(0, STD_SIZE, 1)],
             merge_extents(seen))
    check_eq("qemu:allocation-depth description", "local",
             raw[0].get("description"))
    seen, _ = map_json(ctx, srv.uri())
    check_eq("base:allocation map with -A", want, merge_extents(seen))


@case
def unaligned_raw_file(ctx):
    """A raw file whose size is not a multiple of 512 is served as qemu-nbd
    serves it: rounded up to whole sectors, the tail past the end of the
    file reading as zeroes (a hole in the map), and a write to the tail
    growing the file to the rounded size.  Checked in both cache modes."""
    for nocache in (False, True):
        mode = "--cache=none" if nocache else "default cache"
        img = ctx.path("odd%d.raw" % nocache)
        content = pattern(7, 1000)
        with open(img, "wb") as f:
            f.write(content)

        srv = ctx.start_server(img, nocache_native=nocache)
        h = nbd.NBD()
        h.connect_uri(srv.uri())
        check_eq("%s: export size of a 1,000-byte file" % mode, 1024, h.get_size())
        check_bytes("%s: the whole export" % mode, content + bytes(24),
                    bytes(h.pread(1024, 0)))
        h.shutdown()
        del h
        # With O_DIRECT, qemu-nbd reports block status in whole sectors.
        seen, _ = map_json(ctx, srv.uri())
        allowed = [[(0, 1000, 0), (1000, 24, 3)]] + ([[(0, 1024, 0)]] if nocache else [])
        check_in("%s: map of a 1,000-byte file" % mode, allowed, merge_extents(seen))

        h = nbd.NBD()
        h.connect_uri(srv.uri())
        h.pwrite(b"\xa5" * 24, 1000)
        h.flush()
        check_bytes("%s: the tail after writing it" % mode, b"\xa5" * 24,
                    bytes(h.pread(24, 1000)))
        h.shutdown()
        del h
        srv.stop()
        with open(img, "rb") as f:
            check_bytes("%s: the file after writing the tail" % mode,
                        content + b"\xa5" * 24, f.read())


@case
def export_name(ctx):
    """With -x foo, nbd+unix:///foo connects and reads the image; the names
    "bar" and "" are refused (connect fails, nbdinfo exits non-zero)."""
    img = ctx.path("disk.raw")
    content = make_sparse_image(img, STD_SIZE, STD_EXTENTS)
    srv = ctx.start_server(img, name="foo")

    h = nbd.NBD()
    h.connect_uri(srv.uri("foo"))
    check_eq("size of export foo", STD_SIZE, h.get_size())
    check_eq("export name reported by libnbd", "foo", h.get_export_name())
    data = h.pread(64 * 1024, 0)
    check(bytes(data) == content[:64 * 1024], "data read from foo differs from the image")
    h.shutdown()
    del h

    for bad in ("bar", ""):
        res = ctx.run(["nbdinfo", srv.uri(bad)], check=False, timeout=20)
        check(res.returncode != 0,
              "expected nbdinfo on export %r to fail (only 'foo' exists),"
              " but it exited 0:\n%s" % (bad, res.out))
        h = nbd.NBD()
        try:
            h.connect_uri(srv.uri(bad))
        except nbd.Error as e:
            note("connecting to export %r fails: %s" % (bad, e.string))
        else:
            fail("expected connecting to export %r to fail, but it succeeded"
                 " (size %d)" % (bad, h.get_size()))
        del h  # libnbd closes the handle when it is freed

    # The server is still fine afterwards.
    res = ctx.run(["nbdinfo", "--size", srv.uri("foo")], timeout=20)
    check_eq("nbdinfo --size on foo after refused names", str(STD_SIZE),
             res.out.strip())


@case
def persistent_off(ctx):
    """Without -t the server serves exactly one client and exits (status 0)
    once that client disconnects."""
    img = ctx.path("disk.raw")
    content = make_sparse_image(img, STD_SIZE, STD_EXTENTS)
    # No probe connection: it would be the one client the server serves.
    srv = ctx.start_server(img, persistent=False, probe=False)

    h = nbd.NBD()
    deadline = time.monotonic() + 10
    while True:
        try:
            h.connect_unix(srv.sock)
            break
        except nbd.Error as e:
            # The socket file can exist a moment before listen(); a refused
            # connect never reaches the server, so retrying is harmless.
            if time.monotonic() > deadline or not srv.alive():
                fail("could not connect to the non-persistent server: %s\n"
                     "  stderr:\n%s" % (e, srv.stderr_text()))
            h = nbd.NBD()  # the failed handle is freed (closed) here
            time.sleep(0.05)
    data = h.pread(4096, 0)
    check(bytes(data) == content[:4096], "data read differs from the image")
    check(srv.alive(), "server exited while the client was still connected")
    h.shutdown()
    del h  # frees the handle, closing the socket

    t0 = time.monotonic()
    rc = srv.wait_exit(timeout=5)
    if rc is None:
        fail("expected the server started without -t to exit after its client"
             " disconnected; it is still running after 5 s")
    note("server exited %.2f s after the client disconnected, status %d"
         % (time.monotonic() - t0, rc))
    check_eq("exit status of the non-persistent server", 0, rc)
