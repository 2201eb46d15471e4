/// QEMU's `--cache` modes, and what each turns on.
public enum CacheMode: String, Sendable, CaseIterable {
    case none, writeback, writethrough, directsync, unsafe

    /// O_DIRECT (`cache.direct`).
    public var direct: Bool { self == .none || self == .directsync }
    /// Every write is made stable before it completes (FUA on every write).
    public var writeThrough: Bool { self == .writethrough || self == .directsync }
    /// Flushes are ignored (`cache.no-flush`).
    public var noFlush: Bool { self == .unsafe }
}
