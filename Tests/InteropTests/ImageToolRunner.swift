/// `strata img` and `qemu-img` side by side, for the suites that compare
/// the two tools' reports and images.
protocol ImageToolRunner {}

extension ImageToolRunner {
    func img(_ arguments: [String]) throws -> Harness.Output {
        try Harness.run(Harness.strata, ["img"] + arguments)
    }

    func qemuImg(_ arguments: [String]) throws -> Harness.Output {
        try Harness.run("/usr/bin/qemu-img", arguments)
    }
}
