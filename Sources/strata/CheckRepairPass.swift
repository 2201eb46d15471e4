import BlockLayer
import NIOCore
import QCOW2

/// `qemu-img check -r leaks|all` on a qcow2 image: the repairs, and what
/// qemu-img's repairing pass prints and counts while it makes them.
///
/// qemu-img checks once with the repairs woven in, then checks again
/// ("Double checking the fixed image now..."). Its repairing pass prints
/// the walk's and the refcount comparison's lines, then, if the comparison
/// found anything, compares again and prints "Repairing cluster …" for each
/// refcount it fixes (a leak always; a count too low only with `-r all`).
/// Only then does it judge the COPIED flags, against the repaired
/// refcounts: it fixes them with `-r all`, and with `-r leaks` only if
/// nothing else is wrong any more. Strata checks, repairs, checks between
/// the steps, and works out the same lines and counts from those checks.
struct CheckRepairPass {
    /// `-r all`, or else `-r leaks`.
    let all: Bool
    let driver: QCOW2Driver
    let file: BlockNode

    /// What the repairing pass printed and fixed.
    struct Transcript {
        var messages: [String] = []
        var leaksFixed = 0
        var corruptionsFixed = 0
    }

    /// `-r leaks` met refcounts only a rebuild (`-r all`) can fix.
    struct RebuildNeeded: Error {
        var messages: [String]
    }

    /// A repair that could not be carried out (qemu-img's "Check failed"),
    /// after the lines printed until then.
    struct RepairFailed: Error {
        var error: BlockError
        var messages: [String]
    }

    /// Repairs what `before` (a check of the image as it was) found.
    func run(before: QCOW2Checker.Report) -> EventLoopFuture<Transcript> {
        var transcript = Transcript()
        // The snapshot table is repaired (by `-r all`) as it is found.
        transcript.messages = before.messages[..<before.copiedMessagesStart].map {
            all && $0.hasPrefix("ERROR snapshot table entry ") ? "Repairing" + $0.dropFirst("ERROR".count) : $0
        }
        // Refcounts that cannot be repaired in place (a structure that could
        // not be loaded, a block sharing its cluster, a cluster in use
        // counted 0) are rebuilt by `-r all`; `-r leaks` gives up with
        // qemu-img's error and status. (qemu-img repairs the leaks it found
        // first; Strata writes nothing to an image it cannot make consistent.)
        let rebuild = driver.refcountDamage != nil || before.refcountsNeedRebuild
        let refcountsRepaired: EventLoopFuture<Void>
        if rebuild {
            guard all else {
                return file.eventLoop.makeFailedFuture(RebuildNeeded(messages: transcript.messages))
            }
            transcript.messages.append("Rebuilding refcount structure")
            refcountsRepaired = driver.rebuildRefcounts(file: file).flatMap { freed in
                // qemu-img frees the old structure as leaks, one line each.
                transcript.messages += freed.map { $0.message(repairing: true) }
                return driver.repairRefcounts(file: file)
            }
        } else {
            if before.refcountCorruptions > 0 || before.leaks > 0 {
                transcript.messages += before.mismatches.map {
                    $0.message(repairing: $0.stored > $0.referenced || all)
                }
            }
            refcountsRepaired = driver.repairRefcounts(file: file, onlyLeaks: !all)
        }
        return refcountsRepaired.flatMap {
            QCOW2Checker(driver: driver, file: file).run()
        }.flatMap { middle in
            transcript.leaksFixed = before.leaks - middle.leaks
            transcript.corruptionsFixed = before.refcountCorruptions - middle.refcountCorruptions
            let repairCopied = all || (middle.refcountCorruptions == 0 && middle.leaks == 0 && middle.checkErrors == 0)
            transcript.messages += middle.messages[middle.copiedMessagesStart...].map {
                repairCopied && $0.hasPrefix("ERROR ") ? "Repairing " + $0.dropFirst("ERROR ".count) : $0
            }
            guard repairCopied, !middle.copiedFixes.isEmpty else {
                return file.eventLoop.makeSucceededVoidFuture()
            }
            return driver.repairCopiedFlags(middle.copiedFixes, file: file).map {
                transcript.corruptionsFixed += middle.copiedFixes.count
            }
        }.flatMap {
            guard all, before.incompleteSnapshots > 0 else { return file.eventLoop.makeSucceededVoidFuture() }
            return driver.rewriteSnapshotTable(file: file).map {
                transcript.corruptionsFixed += before.incompleteSnapshots
            }
        }.flatMapError { error in
            file.eventLoop.makeFailedFuture(RepairFailed(error: error as? BlockError ?? .eio,
                                                         messages: transcript.messages))
        }.map { transcript }
    }
}
