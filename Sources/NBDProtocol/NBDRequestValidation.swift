/// Checks a request against what was negotiated, before any I/O: the
/// errors the spec names for bad commands, flags, ranges and sizes.
public enum NBDRequestValidation {
    /// The flags each command accepts when the matching transmission flag
    /// was advertised.
    static func allowedFlags(for command: NBDCommand, session: NBDSession) -> NBDCommandFlags {
        let advertised = session.transmissionFlags
        // FUA is accepted on every command once advertised (the spec asks
        // servers to tolerate it where nothing is written).
        var allowed: NBDCommandFlags = advertised.contains(.sendFUA) ? [.fua] : []
        switch command {
        case .write, .trim:
            break
        case .writeZeroes:
            allowed.insert(.noHole)
            if advertised.contains(.sendFastZero) { allowed.insert(.fastZero) }
        case .read:
            if advertised.contains(.sendDF) { allowed.insert(.dontFragment) }
        case .blockStatus:
            allowed.insert(.reqOne)
        case .flush, .cache, .disconnect:
            break
        }
        return allowed
    }

    /// Returns the error to answer `request` with, or nil when it is valid.
    /// `message` explains it for structured error chunks.
    public static func check(
        _ request: NBDRequest, session: NBDSession
    ) -> (error: NBDError, message: String)? {
        guard let command = request.command else {
            return (.einval, "unknown command \(request.type)")
        }
        // DISC gets no reply whatever its flags, offset and length: the
        // client has stopped reading, and qemu-nbd disconnects at once.
        if command == .disconnect { return nil }
        // A payload that follows the request is not here yet when its
        // header is checked (see `NBDRequestDecoder.takePayload`).
        if request.payloadDiscarded || (command == .write && request.payload == nil && !request.payloadFollows) {
            return (.einval, "write of \(request.length) bytes is over the maximum payload")
        }
        let flags = session.transmissionFlags
        let unexpected = request.flags.subtracting(allowedFlags(for: command, session: session))
        if !unexpected.isEmpty {
            return (.einval, "flags 0x\(String(unexpected.rawValue, radix: 16)) not valid for this command")
        }
        let readOnly = flags.contains(.readOnly)
        switch command {
        case .write, .trim, .writeZeroes:
            if readOnly { return (.eperm, "export is read-only") }
        case .blockStatus:
            if session.metaContexts.isEmpty { return (.einval, "no metadata context negotiated") }
        case .flush:
            // Offset and length must be zero (the spec), but every known client
            // sends zeroes; be lenient as qemu-nbd and nbdkit are.
            return nil
        case .read, .cache:
            break
        case .disconnect:
            break  // accepted above
        }
        if command == .read || command == .write, request.length > session.export.maximumBlockSize {
            return (.einval, "request length \(request.length) is over the maximum \(session.export.maximumBlockSize)")
        }
        if command == .blockStatus, request.length == 0 {
            return (.einval, "block status of zero bytes")
        }
        let size = session.export.size
        if request.offset > size || UInt64(request.length) > size - request.offset {
            let error: NBDError = (command == .write || command == .writeZeroes) ? .enospc : .einval
            return (error, "request past the end of the export (size \(size))")
        }
        return nil
    }
}
