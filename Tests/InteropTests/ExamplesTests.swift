import Foundation
import Testing

/// The scripts in `Examples/` run as a user would run them, against the
/// binary under test, so they stay true.
@Suite struct ExamplesTests {
    static let examples = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Examples")

    @Test(arguments: [
        ("serve-raw-image.sh", "copy is identical"),
        ("serve-qcow2-overlay.sh", "base is untouched"),
    ])
    func exampleRunsAndSaysItWorked(script: String, says: String) throws {
        let path = Self.examples.appendingPathComponent(script).path
        let result = try Harness.run("/bin/bash", [path], environment: ["STRATA": Harness.strata], timeout: 120)
        #expect(result.status == 0, "\(script) failed: \(result.stderr.suffix(1000))")
        #expect(result.stdout.contains(says), "stdout: \(result.stdout.suffix(1000))")
    }
}
