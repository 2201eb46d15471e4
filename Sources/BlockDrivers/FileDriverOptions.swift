import BlockLayer

/// How the `file` driver does I/O: QEMU's `aio` option.
public enum FileAIOMode: String, Sendable, CaseIterable {
    /// pread/pwrite on a thread pool (with a page-cache fast path).
    case threads
    /// Linux AIO (io_submit); needs O_DIRECT.
    case native
    /// io_uring, with or without O_DIRECT.
    case ioUring = "io_uring"
}

/// QEMU's `locking` option of the file driver.
public enum FileLockingMode: String, Sendable, CaseIterable {
    case auto, on, off
}

/// Options of a `file` node, named as QEMU names them.
public struct FileDriverOptions: Sendable, Equatable {
    public var filename: String
    public var readOnly: Bool = false
    /// `cache.direct`: O_DIRECT.
    public var direct: Bool = false
    public var aio: FileAIOMode = .threads
    public var locking: FileLockingMode = .auto
    /// QEMU's `force-share` (`qemu-img -U`): the image locks still say what
    /// this node does (so a writer that refuses readers sees it), but never
    /// refuse anything to others.
    public var forceShare: Bool = false

    public init(filename: String, readOnly: Bool = false, direct: Bool = false,
                aio: FileAIOMode = .threads, locking: FileLockingMode = .auto) {
        self.filename = filename
        self.readOnly = readOnly
        self.direct = direct
        self.aio = aio
        self.locking = locking
    }
}
