extension QCOW2Driver {
    /// The image's persistent bitmaps, in directory order.
    public var bitmaps: [QCOW2BitmapSummary] {
        (bitmapDirectory?.entries ?? []).map { entry in
            QCOW2BitmapSummary(name: entry.name, granularity: 1 << UInt64(entry.granularityBits), inUse: entry.inUse,
                               auto: entry.flags & QCOW2BitmapDirectory.Entry.autoFlag != 0)
        }
    }
}
