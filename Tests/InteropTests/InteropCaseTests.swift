import Foundation
import Testing

/// The client-driven cases in Scripts/interop.py (nbdinfo, nbdcopy,
/// qemu-io, python3-libnbd, raw-socket abuse), each against a fresh
/// `strata serve`. The script was validated against qemu-nbd itself.
@Suite(.serialized) struct InteropCaseTests {
    static let runner = Harness.scripts.appendingPathComponent("interop.py").path

    static var caseNames: [String] {
        guard let output = try? Harness.run("/usr/bin/python3", [runner, "--list"]), output.status == 0 else {
            return ["(interop.py --list failed: is /usr/bin/python3 installed?)"]
        }
        return output.stdout.split(separator: "\n").map(String.init)
    }

    @Test(arguments: caseNames)
    func interopCase(_ name: String) throws {
        let result = try Harness.run("/usr/bin/python3",
                                     [Self.runner, "--server-cmd", "\(Harness.strata) serve", "--case", name],
                                     timeout: 360)  // above the slowest case's own limit (interop.py)
        #expect(result.status == 0, "case \(name) failed:\n\(result.stdout)\n\(result.stderr)")
    }
}
