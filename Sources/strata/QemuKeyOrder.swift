/// The order of keys in each kind of object qemu-img 7.2 prints, as its
/// output shows them.
enum QemuKeyOrder {
    static let imageInfo = [
        "backing-filename-format", "snapshots", "virtual-size", "filename", "cluster-size", "format", "actual-size",
        "format-specific", "full-backing-filename", "backing-filename", "dirty-flag",
    ]
    static let formatSpecific = ["type", "data"]
    static let qcow2Specific = [
        "compat", "compression-type", "lazy-refcounts", "bitmaps", "refcount-bits", "data-file", "data-file-raw",
        "corrupt", "extended-l2",
    ]
    static let snapshot = ["icount", "vm-clock-nsec", "name", "date-sec", "date-nsec", "vm-clock-sec", "id", "vm-state-size"]
    static let bitmap = ["flags", "name", "granularity"]
    static let check = [
        "image-end-offset", "compressed-clusters", "total-clusters", "corruptions", "corruptions-fixed", "check-errors",
        "leaks", "leaks-fixed", "allocated-clusters", "filename", "format", "fragmented-clusters",
    ]
}
