"""qcow2 reader conformance: images made by qemu-img/qemu-io for every
feature qemu-img 7.2 produces, served read-only; what nbdcopy reads must
equal `qemu-img convert -O raw`, and base:allocation / allocation-depth
must agree with `qemu-img map --output=json`."""

import json
import os

from common import MiB, case, check, check_eq, fail, note


def qimg(ctx, *args):
    return ctx.run(["qemu-img"] + [str(a) for a in args])


def qio(ctx, image, *commands, fmt="qcow2"):
    argv = ["qemu-io", "-f", fmt]
    for command in commands:
        argv += ["-c", command]
    return ctx.run(argv + [image])


STD_WRITES = [
    "write -P 0x11 0 64k",
    "write -P 0x22 1M 3M",
    "write -P 0x33 9000 1000",
    "write -z 2M 512k",
    "write -P 0x44 20M 128k",
    "write -z -u 20M 64k",
    "write -P 0x55 60M 4k",
]


def populate(ctx, image, fmt="qcow2", writes=STD_WRITES):
    qio(ctx, image, *writes, fmt=fmt)


def depth_map(ctx, image, extra=()):
    """qemu-img map as [(start, length, nbd_hole_zero_type, nbd_depth)]."""
    out = ctx.run(["qemu-img", "map", "--output=json"] + list(extra) + [image]).out
    entries = []
    for e in json.loads(out):
        kind = (0 if e["data"] else 1) | (2 if e["zero"] else 0)
        depth = e["depth"] + 1 if e["present"] else 0
        entries.append((e["start"], e["length"], kind, depth))
    return entries


def flatten(entries, field):
    """Merge neighbouring extents that agree on one field."""
    merged = []
    for start, length, *values in entries:
        value = values[field]
        if merged and merged[-1][1] == value and merged[-1][0][1] == start:
            (first, _), _ = merged[-1]
            merged[-1] = ((first, start + length), value)
        else:
            merged.append(((start, start + length), value))
    return merged


def nbd_map(ctx, uri, context=None):
    argv = ["nbdinfo", "--json", "--map"] if context is None else ["nbdinfo", "--json", "--map=" + context]
    out = ctx.run(argv + [uri]).out
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]


def check_served(ctx, image, extra=(), fmt="qcow2", convert_extra=(), map_extra=(), compare_maps=True):
    """Serve `image` read-only and check data and maps against qemu-img."""
    ref = ctx.path("ref.raw")
    if os.path.exists(ref):
        os.unlink(ref)
    qimg(ctx, "convert", "-O", "raw", *convert_extra, image, ref)
    srv = ctx.start_server(image, readonly=True, fmt=fmt, extra=["-A"] + list(extra))
    out = ctx.path("out.raw")
    if os.path.exists(out):
        os.unlink(out)
    ctx.run(["nbdcopy", srv.uri(), out])
    ctx.cmp_files(ref, out, what="nbdcopy of the export vs qemu-img convert")
    if compare_maps:
        expected = depth_map(ctx, image, map_extra)
        seen = nbd_map(ctx, srv.uri())
        check_eq("base:allocation vs qemu-img map (hole/zero)",
                 flatten(expected, 0), flatten([(o, l, t) for o, l, t in seen], 0))
        depth = nbd_map(ctx, srv.uri(), "qemu:allocation-depth")
        check_eq("qemu:allocation-depth vs qemu-img map (depth)",
                 flatten(expected, 1), flatten([(o, l, t) for o, l, t in depth], 0))
    srv.stop()


@case
def qcow2_default(ctx):
    """Default qcow2 (v3, 64 KiB clusters): data, zero clusters (kept and
    unmapped), an unaligned write; probed without -f."""
    img = ctx.path("d.qcow2")
    qimg(ctx, "create", "-f", "qcow2", img, "64M")
    populate(ctx, img)
    check_served(ctx, img)
    check_served(ctx, img, fmt=None)


@case
def qcow2_v2(ctx):
    """compat=0.10 (version 2): no zero flag, 72-byte header."""
    img = ctx.path("v2.qcow2")
    qimg(ctx, "create", "-f", "qcow2", "-o", "compat=0.10", img, "64M")
    populate(ctx, img, writes=[w for w in STD_WRITES if "-z" not in w])
    check_served(ctx, img)


@case
def qcow2_cluster_sizes(ctx):
    """Cluster sizes 512 B, 4 KiB and 2 MiB."""
    for size in ["512", "4k", "2M"]:
        img = ctx.path("c%s.qcow2" % size)
        qimg(ctx, "create", "-f", "qcow2", "-o", "cluster_size=" + size, img, "64M")
        populate(ctx, img)
        check_served(ctx, img)


@case
def qcow2_refcount_widths(ctx):
    """Refcount widths 1 and 64 bits (reading ignores them; header parses)."""
    for bits in ["1", "8", "64"]:
        img = ctx.path("r%s.qcow2" % bits)
        qimg(ctx, "create", "-f", "qcow2", "-o", "refcount_bits=" + bits, img, "32M")
        populate(ctx, img, writes=["write -P 0x61 0 1M", "write -P 0x62 30M 64k"])
        check_served(ctx, img)


@case
def qcow2_preallocated(ctx):
    """preallocation=metadata: every cluster allocated, the file sparse;
    allocated clusters over holes read and map as zero data."""
    img = ctx.path("p.qcow2")
    qimg(ctx, "create", "-f", "qcow2", "-o", "preallocation=metadata", img, "32M")
    qio(ctx, img, "write -P 0x71 4M 1M")
    check_served(ctx, img)


@case
def qcow2_compressed_zlib(ctx):
    """zlib-compressed clusters from `qemu-img convert -c`, several packed
    into one host cluster."""
    raw = ctx.path("src.raw")
    qimg(ctx, "create", "-f", "raw", raw, "16M")
    qio(ctx, raw, "write -P 0x81 0 4M", "write -P 0x82 6M 100k", fmt="raw")
    img = ctx.path("z.qcow2")
    qimg(ctx, "convert", "-c", "-O", "qcow2", raw, img)
    check_served(ctx, img)


@case
def qcow2_compressed_zstd(ctx):
    """zstd compression (compression_type=zstd), written with qemu-io -c."""
    img = ctx.path("zs.qcow2")
    qimg(ctx, "create", "-f", "qcow2", "-o", "compression_type=zstd", img, "16M")
    qio(ctx, img, "write -c -P 0x91 0 64k", "write -c -P 0x92 128k 64k", "write -P 0x93 1M 64k")
    check_served(ctx, img)


@case
def qcow2_extended_l2(ctx):
    """Extended L2 (32 subclusters of 4 KiB in 128 KiB clusters): partial
    cluster writes, zeroed subclusters, over a backing file."""
    base = ctx.path("xb.qcow2")
    qimg(ctx, "create", "-f", "qcow2", base, "16M")
    qio(ctx, base, "write -P 0xa1 0 16M")
    img = ctx.path("x.qcow2")
    qimg(ctx, "create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=128k", "-b", "xb.qcow2", "-F", "qcow2", img)
    qio(ctx, img, "write -P 0xa2 4k 8k", "write -z 64k 4k", "write -P 0xa3 1M 128k", "write -z 3M 256k")
    check_served(ctx, img)


@case
def qcow2_data_file(ctx):
    """External data file, and data_file_raw."""
    for raw_flag in ["off", "on"]:
        img = ctx.path("df-%s.qcow2" % raw_flag)
        # qemu-img resolves a relative data file against the current
        # directory: name it absolutely so the server finds it too.
        data = ctx.path("df-%s.data" % raw_flag)
        qimg(ctx, "create", "-f", "qcow2", "-o", "data_file=%s,data_file_raw=%s" % (data, raw_flag), img, "16M")
        qio(ctx, img, "write -P 0xb1 0 1M", "write -P 0xb2 8M 64k")
        check_served(ctx, img)


@case
def qcow2_lazy_refcounts_dirty(ctx):
    """lazy_refcounts=on with the dirty bit left set (qemu-io aborts):
    served read-only as it is."""
    img = ctx.path("lazy.qcow2")
    qimg(ctx, "create", "-f", "qcow2", "-o", "lazy_refcounts=on", img, "16M")
    # qemu-io's `abort` kills it (SIGABRT) with the dirty bit still set.
    ctx.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xc1 0 1M", "-c", "write -P 0xc2 4M 64k", "-c", "abort", img],
            check=False)
    info = json.loads(qimg(ctx, "info", "--output=json", "-U", img).out)
    check(info.get("dirty-flag") is True, "the dirty bit is set (qemu-img info: %s)" % info.get("dirty-flag"))
    check_served(ctx, img)


@case
def qcow2_snapshots(ctx):
    """Internal snapshots: the active layer is served, and -l serves a
    snapshot read-only as qemu-nbd -l does."""
    img = ctx.path("s.qcow2")
    qimg(ctx, "create", "-f", "qcow2", img, "16M")
    qio(ctx, img, "write -P 0xd1 0 2M")
    qimg(ctx, "snapshot", "-c", "first", img)
    qio(ctx, img, "write -P 0xd2 1M 2M", "write -z 0 64k")
    qimg(ctx, "snapshot", "-c", "second", img)
    qio(ctx, img, "write -P 0xd3 8M 1M")
    check_served(ctx, img)
    check_served(ctx, img, extra=["-l", "first"], convert_extra=["-l", "snapshot.name=first"], compare_maps=False)
    check_served(ctx, img, extra=["-l", "snapshot.name=second"], convert_extra=["-l", "snapshot.name=second"],
                 compare_maps=False)


@case
def qcow2_bitmaps(ctx):
    """A persistent dirty bitmap extension is present and ignored."""
    img = ctx.path("b.qcow2")
    qimg(ctx, "create", "-f", "qcow2", img, "16M")
    ctx.run(["qemu-img", "bitmap", "--add", img, "b0"])
    qio(ctx, img, "write -P 0xe1 0 1M")
    check_served(ctx, img)


@case
def qcow2_backing_chains(ctx):
    """A three-layer chain (qcow2 over qcow2 over raw), relative backing
    names, the backing-format extension, and a backing file shorter than
    its overlay."""
    base = ctx.path("base.raw")
    qimg(ctx, "create", "-f", "raw", base, "8M")
    qio(ctx, base, "write -P 0xf1 0 8M", fmt="raw")
    mid = ctx.path("mid.qcow2")
    qimg(ctx, "create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid, "16M")
    qio(ctx, mid, "write -P 0xf2 1M 1M", "write -z 3M 64k")
    top = ctx.path("top.qcow2")
    qimg(ctx, "create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top, "32M")
    qio(ctx, top, "write -P 0xf3 1536k 64k", "write -P 0xf4 20M 64k")
    check_served(ctx, top)
    # Without the backing-format extension the backing file is probed.
    # qemu-img 7.2 insists on -F, so rename the extension to an unknown
    # type, which must be skipped (and kept) by readers.
    nofmt = ctx.path("nofmt.qcow2")
    qimg(ctx, "create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", nofmt, "16M")
    with open(nofmt, "r+b") as f:
        head = bytearray(f.read(4096))
        at = head.find(bytes.fromhex("e2792aca"), 104)
        check(at > 0, "the backing format extension is in the header")
        head[at:at + 4] = bytes.fromhex("7a7a7a7a")
        f.seek(0)
        f.write(head)
    check_served(ctx, nofmt)


@case
def qcow2_hostile_headers(ctx):
    """Broken and hostile headers are refused with a message, never a crash."""
    good = ctx.path("good.qcow2")
    qimg(ctx, "create", "-f", "qcow2", good, "16M")
    with open(good, "rb") as f:
        original = bytearray(f.read())

    def variant(name, patch):
        data = bytearray(original)
        patch(data)
        path = ctx.path(name + ".qcow2")
        with open(path, "wb") as f:
            f.write(data)
        return path

    def put(data, offset, value, size):
        data[offset:offset + size] = value.to_bytes(size, "big")

    cases = {
        "cluster-bits": lambda d: put(d, 20, 40, 4),
        "l1-size": lambda d: put(d, 36, 0xffffffff, 4),
        "l1-past-eof": lambda d: put(d, 40, 1 << 40, 8),
        "l1-over-header": lambda d: put(d, 40, 0, 8),
        "incompatible-bit": lambda d: put(d, 72, 1 << 20, 8),
        "encrypted": lambda d: put(d, 32, 2, 4),
        "encrypted-aes": lambda d: put(d, 32, 1, 4),
        "refcount-order": lambda d: put(d, 96, 9, 4),
        "header-length": lambda d: put(d, 100, 1 << 30, 4),
        "snapshots": lambda d: (put(d, 60, 1000, 4), put(d, 64, 1 << 50, 8)),
        "version": lambda d: put(d, 4, 7, 4),
    }
    for name, patch in cases.items():
        path = variant(name, patch)
        srv = ctx.start_server(path, readonly=True, fmt="qcow2", wait=False)
        status = srv.wait_exit(20)
        check(status is not None and status != 0 and status > 0,
              "%s: the server refuses the image (exit status %s)" % (name, status))
        text = srv.stderr_text()
        check("strata:" in text and "Fatal error" not in text and "crash" not in text.lower(),
              "%s: a clear message, no crash: %s" % (name, text[-400:]))
        if name.startswith("encrypted"):
            check("not supported" in text, "%s: the message says encryption is not supported: %s" % (name, text[-400:]))
        note("%s: %s" % (name, text.strip().splitlines()[-1] if text.strip() else "(no message)"))
