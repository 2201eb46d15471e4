/// Options every node has, whatever its driver (QEMU's common node options).
public struct BlockNodeOptions: Equatable, Sendable {
    public var readOnly: Bool = false
    public var discard: DiscardMode = .ignore
    public var detectZeroes: DetectZeroesMode = .off
    /// `cache.no-flush`: flushes succeed without reaching the disk
    /// (`--cache=unsafe`).
    public var ignoreFlush: Bool = false

    public init(readOnly: Bool = false, discard: DiscardMode = .ignore,
                detectZeroes: DetectZeroesMode = .off, ignoreFlush: Bool = false) {
        self.readOnly = readOnly
        self.discard = discard
        self.detectZeroes = detectZeroes
        self.ignoreFlush = ignoreFlush
    }
}
