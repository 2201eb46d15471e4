import BlockLayer
import NBDProtocol

/// Gathers the extents of one metadata context for a BLOCK_STATUS reply,
/// merging neighbours with equal flags.
enum ExtentCollector {
    enum Kind {
        /// `base:allocation`: HOLE and ZERO bits.
        case allocation
        /// `qemu:allocation-depth`: the depth in the backing chain.
        case allocationDepth
    }

    /// Most extents in one reply; the client asks again for the rest.
    static let maxExtents = 1024

    typealias Extent = (length: UInt32, flags: UInt32)

    static func collect(_ kind: Kind, backend: BlockBackend, offset: Int64, length: Int64, maxExtents: Int,
                        completion: @escaping (Result<[Extent], BlockError>) -> Void) {
        var extents: [Extent] = []
        var position = offset
        let end = offset + length
        // A trampoline: drivers may answer synchronously, and a long run of
        // extents must not deepen the stack.
        var running = false
        var answeredInline = false
        var finished = false

        func record(_ extentLength: Int64, _ flags: UInt32) {
            let clamped = UInt32(min(extentLength, end - position))
            if let last = extents.last, last.flags == flags, UInt64(last.length) + UInt64(clamped) <= UInt64(UInt32.max) {
                extents[extents.count - 1].length += clamped
            } else {
                extents.append((clamped, flags))
            }
            position += Int64(clamped)
        }

        func handle(_ result: Result<(Int64, UInt32), BlockError>) {
            switch result {
            case .failure(let error):
                finished = true
                completion(.failure(error))
            case .success(let (extentLength, flags)):
                record(extentLength, flags)
                if position >= end || extents.count >= maxExtents {
                    finished = true
                    completion(.success(extents))
                } else if running {
                    answeredInline = true
                } else {
                    step()
                }
            }
        }

        func query() {
            switch kind {
            case .allocation:
                backend.blockStatus(at: position, length: end - position) { result in
                    handle(result.map { status in
                        var flags: NBDAllocationFlags = []
                        if !status.flags.contains(.data) { flags.insert(.hole) }
                        if status.flags.contains(.zero) { flags.insert(.zero) }
                        return (status.length, flags.rawValue)
                    })
                }
            case .allocationDepth:
                backend.allocationDepth(at: position, length: end - position) { result in
                    handle(result.map { ($0.length, $0.depth) })
                }
            }
        }

        func step() {
            repeat {
                running = true
                answeredInline = false
                query()
                running = false
            } while answeredInline && !finished
        }
        step()
    }
}
