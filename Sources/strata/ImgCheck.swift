import ArgumentParser
import BlockDrivers
import BlockLayer
import FoundationEssentials
import Glibc
import NIOCore
import QCOW2

/// `strata img check`: qemu-img check's report and exit codes
/// (0 clean, 2 corruptions, 3 leaks only, 1 could not check, 63 no checks
/// for this format).
struct ImgCheck: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "check", abstract: "Check an image for consistency.")

    @OptionGroup var image: ImageArguments

    @Option(name: [.customShort("r"), .customLong("repair")], help: "Repair: leaks, or all (leaks and corrupted refcounts).")
    var repair: String?

    @Flag(name: .customShort("q"), help: "Quiet: print no report (what was found still goes to stderr).")
    var quiet = false

    func run() throws {
        if let repair, !["leaks", "all"].contains(repair) {
            fail("Unknown option for -r (expecting 'leaks' or 'all'): \(repair)")
        }
        // The report of the last check, and what a repair fixed.
        let outcome: (format: String, report: QCOW2Checker.Report?, fixed: CheckRepairPass.Fixed?)
        do {
            outcome = try ImageSession().withImage(image.filename, format: image.format, forceShare: image.forceShare,
                                                   writable: repair != nil, forRepair: repair != nil,
                                                   forRepairAll: repair == "all",
                                                   forCheck: repair == nil) { node in
                guard let driver = node.driver as? QCOW2Driver, let file = node.child(named: "file")?.node else {
                    return node.eventLoop.makeSucceededFuture((node.formatName, nil, nil))
                }
                guard let repair else {
                    return QCOW2Checker(driver: driver, file: file).run().map { ("qcow2", $0, nil) }
                }
                // Check, repair, then check again, reporting what was fixed.
                let pass = CheckRepairPass(all: repair == "all", driver: driver, file: file,
                                           emit: printToStandardError)
                return QCOW2Checker(driver: driver, file: file).run().flatMap { before in
                    pass.run(before: before)
                }.flatMap { fixed in
                    QCOW2Checker(driver: driver, file: file).run().map { (fixed, $0) }
                }.flatMap { fixed, after in
                    // Consistent now: clear the dirty and corrupt bits. With
                    // only the refcounts right, the dirty bit (qemu-img clears
                    // it on close whatever is left; Strata keeps it while
                    // counts are wrong, for the next open to repair them).
                    let cleared: EventLoopFuture<Void>
                    if after.corruptions == 0, after.checkErrors == 0 {
                        cleared = driver.markConsistent(file: file)
                    } else if after.mismatches.isEmpty, !after.refcountsNeedRebuild, after.checkErrors == 0 {
                        cleared = driver.markClean(file: file)
                    } else {
                        cleared = file.eventLoop.makeSucceededVoidFuture()
                    }
                    return cleared.map { ("qcow2", after, fixed) }
                }
            }
        } catch let failure as CheckRepairPass.RepairFailed {
            fail("Check failed: \(String(cString: strerror(failure.error.errno)))")
        } catch is CheckRepairPass.RebuildNeeded {
            printToStandardError(["ERROR need to rebuild refcount structures"])
            fail("Check failed: Input/output error")
        } catch {
            let reason = (error as? BlockError)?.description ?? "\(error)"
            // qemu-img opens for a check without judging the snapshot
            // table's place, and the check then fails on it.
            if reason == QCOW2Header.snapshotTableOffsetInvalid {
                StandardError.write("strata img: ERROR snapshot table offset invalid\n")
                fail("Check failed: Invalid argument")
            }
            // Snapshot tables qemu-img's check reads and gives up on (`-r
            // all` cuts them instead); the reason ends with a hint.
            if reason.hasPrefix(QCOW2SnapshotTable.tooMuchExtraData) || reason.hasPrefix(QCOW2SnapshotTable.tooBig) {
                StandardError.write("strata img: ERROR failed to read the snapshot table: \(reason)\n")
                fail("Check failed: File too large")
            }
            fail("Could not open '\(image.filename)': \(reason)")
        }
        guard let report = outcome.report else {
            fail("This image format does not support checks", status: 63)
        }
        // qemu-img writes what it found to stderr whatever the output format
        // (a repairing pass has printed its lines): what the last check found,
        // unless that was a repairing pass that fixed nothing, after which
        // qemu-img does not check again.
        let fixed = outcome.fixed ?? CheckRepairPass.Fixed()
        if outcome.fixed == nil || fixed.leaks > 0 || fixed.corruptions > 0 {
            printToStandardError(report.messages)
        }
        // -q prints no report, as qemu-img's; the exit status still tells.
        switch quiet ? nil : image.output {
        case nil:
            break
        case .json?:
            var object: [String: QemuJSON] = [
                "filename": .string(image.filename), "format": .string(outcome.format),
                "check-errors": .int(Int64(report.checkErrors)), "image-end-offset": .int(report.imageEndOffset),
            ]
            // qemu-img leaves out the counts that are 0.
            let counts = ["total-clusters": report.totalClusters, "allocated-clusters": report.allocatedClusters,
                          "fragmented-clusters": report.fragmentedClusters, "compressed-clusters": report.compressedClusters,
                          "corruptions": report.corruptions, "leaks": report.leaks,
                          "leaks-fixed": fixed.leaks, "corruptions-fixed": fixed.corruptions]
            for (key, count) in counts where count > 0 { object[key] = .int(Int64(count)) }
            print(QemuJSON.object(object, order: QemuKeyOrder.check).rendered())
        case .human?:
            if fixed.leaks > 0 || fixed.corruptions > 0 {
                print("The following inconsistencies were found and repaired:\n")
                print("    \(fixed.leaks) leaked clusters")
                print("    \(fixed.corruptions) corruptions\n")
                print("Double checking the fixed image now...")
            }
            if report.corruptions > 0 {
                print("\n\(report.corruptions) errors were found on the image.")
                print("Data may be corrupted, or further writes to the image may corrupt it.")
            }
            if report.leaks > 0 {
                print("\n\(report.leaks) leaked clusters were found on the image.")
                print("This means waste of disk space, but no harm to data.")
            }
            if report.checkErrors > 0 {
                print("\n\(report.checkErrors) internal errors have occurred during the check.")
            }
            if report.corruptions == 0, report.leaks == 0, report.checkErrors == 0 {
                print("No errors were found on the image.")
            }
            // As qemu-img, only an image with allocated clusters gets the line.
            if report.totalClusters > 0, report.allocatedClusters > 0 {
                let percent = { (value: Int, base: Int) in String(printf: "%.2f", Double(value) * 100 / Double(base)) }
                print("\(report.allocatedClusters)/\(report.totalClusters) = "
                      + "\(percent(report.allocatedClusters, report.totalClusters))% allocated, "
                      + "\(percent(report.fragmentedClusters, report.allocatedClusters))% fragmented, "
                      + "\(percent(report.compressedClusters, report.allocatedClusters))% compressed clusters")
            }
            print("Image end offset: \(report.imageEndOffset)")
        }
        // As qemu-img: the report, then the failure.
        if report.checkErrors > 0 { fail("Check failed") }
        if report.corruptions > 0 { throw ExitCode(2) }
        if report.leaks > 0 { throw ExitCode(3) }
    }

    private func printToStandardError(_ messages: [String]) {
        for message in messages { StandardError.write(message + "\n") }
    }
}
