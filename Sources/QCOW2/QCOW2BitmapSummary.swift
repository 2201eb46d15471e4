/// A persistent bitmap as `qemu-img info` lists it.
public struct QCOW2BitmapSummary: Sendable {
    public var name: String
    public var granularity: UInt64
    /// Left set by a process that had the image open and did not close it.
    public var inUse: Bool
    /// Tracks guest writes whenever the image is opened read-write.
    public var auto: Bool
}
