extension BinaryInteger {
    /// The number as C's `%#x` prints it: `0`, or hex with `0x`. QEMU
    /// words its corruption messages with it, and so do we, byte for byte.
    var alternateHex: String {
        self == 0 ? "0" : "0x" + String(self, radix: 16)
    }
}
