/// A persistent bitmap as `qemu-img info` lists it.
public struct QCOW2BitmapSummary: Sendable {
    public var name: String
    public var granularity: UInt64
    /// Left set by a process that had the image open and did not close it.
    public var inUse: Bool
    /// Tracks guest writes whenever the image is opened read-write.
    public var auto: Bool
}

extension QCOW2Driver {
    /// The image's persistent bitmaps, in directory order.
    public var bitmaps: [QCOW2BitmapSummary] {
        (bitmapDirectory?.entries ?? []).map { entry in
            QCOW2BitmapSummary(name: entry.name, granularity: 1 << UInt64(entry.granularityBits), inUse: entry.inUse,
                               auto: entry.flags & QCOW2BitmapDirectory.Entry.autoFlag != 0)
        }
    }
}
