@testable import NBDProtocol
import NBDTestSupport
import NIOCore
import Testing

@Suite struct NBDNegotiationTests {
    let catalog = TestCatalog()

    func negotiated(_ options: [NBDOptionRequest], flags: NBDClientFlags = [.fixedNewstyle, .noZeroes])
        -> (NBDNegotiation.Action, ByteBuffer)
    {
        var machine = NBDNegotiation()
        var out = ByteBuffer()
        var action = machine.receive(.clientFlags(flags), catalog: catalog, into: &out)
        for option in options {
            action = machine.receive(.option(option), catalog: catalog, into: &out)
        }
        return (action, out)
    }

    @Test func greetingIsFixedNewstyleWithNoZeroes() {
        var out = ByteBuffer()
        NBDNegotiation.writeGreeting(into: &out)
        #expect(out.readableBytes == 18)
        #expect(out.getInteger(at: 0, as: UInt64.self) == 0x4e42_444d_4147_4943)
        #expect(out.getInteger(at: 16, as: UInt16.self) == 3)
    }

    @Test func unknownClientFlagsClose() {
        let (action, _) = negotiated([], flags: NBDClientFlags(rawValue: 0x80))
        guard case .close = action else { Issue.record("expected close, got \(action)"); return }
    }

    @Test func goSendsExportInfoBlockSizeAndAck() {
        let (action, out) = negotiated([.structuredReply, .go(exportName: "disk", requests: [1, 2])])
        guard case .startTransmission(let session) = action else {
            Issue.record("expected transmission, got \(action)")
            return
        }
        #expect(session.structuredReplies)
        #expect(session.transmissionFlags.contains(.sendDF))
        let replies = Wire.replies(out)
        #expect(replies.first?.1 == NBDOptionReplyType.ack.rawValue)  // structured reply
        let infos = replies.dropFirst().filter { $0.1 == NBDOptionReplyType.info.rawValue }.map { $0.2 }
        let types = infos.map { UInt16($0[0]) << 8 | UInt16($0[1]) }
        #expect(types == [0, 1, 2, 3])
        #expect(infos[0].count == 12)
        #expect(infos[3].count == 14)
        #expect(replies.last?.1 == NBDOptionReplyType.ack.rawValue)
    }

    @Test func dfIsNotOfferedWithoutStructuredReplies() {
        let (action, _) = negotiated([.go(exportName: "disk", requests: [])])
        guard case .startTransmission(let session) = action else { Issue.record("\(action)"); return }
        #expect(!session.transmissionFlags.contains(.sendDF))
    }

    @Test func unknownExportIsAnErrorAndNegotiationGoesOn() {
        var machine = NBDNegotiation()
        var out = ByteBuffer()
        _ = machine.receive(.clientFlags(.fixedNewstyle), catalog: catalog, into: &out)
        let action = machine.receive(.option(.go(exportName: "nope", requests: [])), catalog: catalog, into: &out)
        #expect(action == .proceed)
        #expect(Wire.replies(out).map(\.1) == [NBDOptionReplyType.errUnknown.rawValue])
        let next = machine.receive(.option(.go(exportName: "", requests: [])), catalog: catalog, into: &out)
        guard case .startTransmission = next else { Issue.record("\(next)"); return }
    }

    @Test func exportNameRepliesWithOrWithoutZeroes() {
        let (action, out) = negotiated([.exportName("disk")], flags: .fixedNewstyle)
        guard case .startTransmission = action else { Issue.record("\(action)"); return }
        #expect(out.readableBytes == 134)
        let (_, short) = negotiated([.exportName("disk")])
        #expect(short.readableBytes == 10)
        let (unknown, _) = negotiated([.exportName("missing")])
        guard case .close = unknown else { Issue.record("\(unknown)"); return }
    }

    @Test func repliesForUnsupportedInvalidTooBigAndRepeatedOptions() {
        let (_, out) = negotiated([
            .unsupported(code: 99), .invalid(code: 3, reason: "x"), .tooBig(code: 7),
            .structuredReply, .structuredReply,
        ])
        #expect(Wire.replies(out).map(\.1) == [
            NBDOptionReplyType.errUnsupported.rawValue, NBDOptionReplyType.errInvalid.rawValue,
            NBDOptionReplyType.errTooBig.rawValue, NBDOptionReplyType.ack.rawValue,
            NBDOptionReplyType.errInvalid.rawValue,
        ])
    }

    @Test func metaContextsNeedStructuredRepliesAndMatchByNameOrNamespace() {
        let (_, early) = negotiated([.setMetaContext(exportName: "disk", queries: ["base:allocation"])])
        #expect(Wire.replies(early).map(\.1) == [NBDOptionReplyType.errInvalid.rawValue])

        let (_, listed) = negotiated([.structuredReply, .listMetaContext(exportName: "disk", queries: [])])
        let names = Wire.replies(listed).filter { $0.1 == 4 }.map { String(decoding: $0.2.dropFirst(4), as: UTF8.self) }
        #expect(names == ["base:allocation", "qemu:allocation-depth"])

        let (_, namespace) = negotiated([.structuredReply, .listMetaContext(exportName: "disk", queries: ["qemu:"])])
        #expect(Wire.replies(namespace).filter { $0.1 == 4 }.count == 1)

        // SET ignores bare namespaces and unknown names; selects exact ones.
        let (action, set) = negotiated([
            .structuredReply,
            .setMetaContext(exportName: "disk", queries: ["base:", "nope:x", "base:allocation"]),
            .go(exportName: "disk", requests: []),
        ])
        #expect(Wire.replies(set).filter { $0.1 == 4 }.count == 1)
        guard case .startTransmission(let session) = action else { Issue.record("\(action)"); return }
        #expect(session.metaContexts.map(\.name) == ["base:allocation"])
    }

    /// By GO or by EXPORT_NAME (which kept them before).
    @Test(arguments: [NBDOptionRequest.go(exportName: "", requests: []), .exportName("")])
    func contextsChosenForAnotherExportAreDropped(start: NBDOptionRequest) {
        let (action, _) = negotiated([
            .structuredReply,
            .setMetaContext(exportName: "disk", queries: ["base:allocation"]),
            start,
        ])
        guard case .startTransmission(let session) = action else { Issue.record("\(action)"); return }
        #expect(session.metaContexts.isEmpty)
    }

    @Test func listNamesEveryExportAndAbortAcks() {
        let (_, out) = negotiated([.list])
        let replies = Wire.replies(out)
        #expect(replies.map(\.1) == [2, 2, 1])
        let (action, abortOut) = negotiated([.abort])
        guard case .close = action else { Issue.record("\(action)"); return }
        #expect(Wire.replies(abortOut).map(\.1) == [1])
    }
}
