import ArgumentParser
import BlockDrivers
import BlockLayer
import Foundation
import NIOCore
import QCOW2

/// `strata img check`: qemu-img check's report and exit codes
/// (0 clean, 2 corruptions, 3 leaks only, 1 could not check, 63 no checks
/// for this format).
struct ImgCheck: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "check", abstract: "Check an image for consistency.")

    @OptionGroup var image: ImageArguments

    @Option(name: .customShort("r"), help: "Repair: leaks, or all (leaks and corrupted refcounts).")
    var repair: String?

    /// `-r leaks` met refcounts only a rebuild (`-r all`) can fix.
    struct RebuildNeeded: Error {
        var messages: [String]
    }

    /// A repair that could not be carried out (qemu-img's "Check failed").
    struct RepairFailed: Error {
        var error: BlockError
    }

    func run() throws {
        if let repair, !["leaks", "all"].contains(repair) {
            fail("Unknown option for -r (expecting 'leaks' or 'all'): \(repair)")
        }
        /// What a repair fixed: the first check's counts less the second's.
        typealias Fixed = (leaks: Int, corruptions: Int)
        let outcome: (format: String, report: QCOW2Checker.Report?, fixed: Fixed)
        do {
            outcome = try ImageSession().withImage(image.filename, format: image.format, forceShare: image.forceShare,
                                                   writable: repair != nil, forRepair: repair != nil) { node in
                guard let driver = node.driver as? QCOW2Driver, let file = node.child(named: "file")?.node else {
                    return node.eventLoop.makeSucceededFuture((node.formatName, nil, (0, 0)))
                }
                guard let repair else {
                    return QCOW2Checker(driver: driver, file: file).run().map { ("qcow2", $0, (0, 0)) }
                }
                // Check, repair, then check again, reporting what was fixed.
                return QCOW2Checker(driver: driver, file: file).run().flatMap { before in
                    // Refcounts that cannot be repaired in place (a structure
                    // that could not be loaded, a block sharing its cluster,
                    // a cluster in use counted 0) are rebuilt by `-r all`;
                    // `-r leaks` gives up with qemu-img's error and status.
                    // (qemu-img repairs the leaks it found first; Strata
                    // writes nothing to an image it cannot make consistent.)
                    let rebuild = driver.refcountDamage != nil || before.refcountsNeedRebuild
                    if rebuild, repair == "leaks" {
                        return file.eventLoop.makeFailedFuture(RebuildNeeded(messages: before.messages))
                    }
                    let rebuilt = rebuild ? driver.rebuildRefcounts(file: file) : file.eventLoop.makeSucceededVoidFuture()
                    return rebuilt.flatMap {
                        driver.repairRefcounts(file: file, onlyLeaks: repair == "leaks")
                    }.flatMap { () -> EventLoopFuture<Int> in
                        guard repair == "all", before.corruptions > 0 else { return file.eventLoop.makeSucceededFuture(0) }
                        return driver.repairCopiedFlags(file: file).flatMapErrorThrowing { error in
                            throw RepairFailed(error: error as? BlockError ?? .eio)
                        }
                    }.flatMap { copiedFixed in
                        guard repair == "all", before.incompleteSnapshots > 0 else {
                            return file.eventLoop.makeSucceededFuture(copiedFixed)
                        }
                        return driver.rewriteSnapshotTable(file: file).map { copiedFixed }
                    }.flatMap { copiedFixed in
                        QCOW2Checker(driver: driver, file: file).run().map { (copiedFixed, $0) }
                    }.flatMap { copiedFixed, after in
                        // Consistent now: clear the dirty and corrupt bits.
                        guard after.corruptions == 0, after.checkErrors == 0 else {
                            return file.eventLoop.makeSucceededFuture((copiedFixed, after))
                        }
                        return driver.markConsistent(file: file).map { (copiedFixed, after) }
                    }.map { copiedFixed, after in
                        // As qemu-img counts: the COPIED flags are judged
                        // against the repaired refcounts, so the first
                        // check's COPIED errors give way to those fixed.
                        let found = repair == "all" ? before.corruptions - before.copiedFixes.count + copiedFixed
                            : before.corruptions
                        return ("qcow2", after, (before.leaks - after.leaks, max(0, found - after.corruptions)))
                    }
                }
            }
        } catch let failure as RepairFailed {
            fail("Check failed: \(String(cString: strerror(failure.error.errno)))")
        } catch let error as RebuildNeeded {
            for message in error.messages + ["ERROR need to rebuild refcount structures"] {
                FileHandle.standardError.write(Data((message + "\n").utf8))
            }
            fail("Check failed: Input/output error")
        } catch {
            fail("Could not open '\(image.filename)': \((error as? BlockError)?.description ?? "\(error)")")
        }
        guard let report = outcome.report else {
            fail("This image format does not support checks", status: 63)
        }
        // qemu-img writes what it found to stderr whatever the output format.
        for message in report.messages { FileHandle.standardError.write(Data((message + "\n").utf8)) }
        switch image.output {
        case .json:
            var object: [String: QemuJSON] = [
                "filename": .string(image.filename), "format": .string(outcome.format),
                "check-errors": .int(Int64(report.checkErrors)), "image-end-offset": .int(report.imageEndOffset),
            ]
            // qemu-img leaves out the counts that are 0.
            let counts = ["total-clusters": report.totalClusters, "allocated-clusters": report.allocatedClusters,
                          "fragmented-clusters": report.fragmentedClusters, "compressed-clusters": report.compressedClusters,
                          "corruptions": report.corruptions, "leaks": report.leaks,
                          "leaks-fixed": outcome.fixed.leaks, "corruptions-fixed": outcome.fixed.corruptions]
            for (key, count) in counts where count > 0 { object[key] = .int(Int64(count)) }
            print(QemuJSON.object(object, order: QemuKeyOrder.check).rendered())
        case .human:
            if outcome.fixed.leaks > 0 || outcome.fixed.corruptions > 0 {
                print("The following inconsistencies were found and repaired:\n")
                print("    \(outcome.fixed.leaks) leaked clusters")
                print("    \(outcome.fixed.corruptions) corruptions\n")
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
            if report.corruptions == 0, report.leaks == 0 { print("No errors were found on the image.") }
            // As qemu-img, only an image with allocated clusters gets the line.
            if report.totalClusters > 0, report.allocatedClusters > 0 {
                let percent = { (value: Int, base: Int) in String(format: "%.2f", Double(value) * 100 / Double(base)) }
                print("\(report.allocatedClusters)/\(report.totalClusters) = "
                      + "\(percent(report.allocatedClusters, report.totalClusters))% allocated, "
                      + "\(percent(report.fragmentedClusters, report.allocatedClusters))% fragmented, "
                      + "\(percent(report.compressedClusters, report.allocatedClusters))% compressed clusters")
            }
            print("Image end offset: \(report.imageEndOffset)")
        }
        if report.checkErrors > 0 { throw ExitCode(1) }
        if report.corruptions > 0 { throw ExitCode(2) }
        if report.leaks > 0 { throw ExitCode(3) }
    }
}
