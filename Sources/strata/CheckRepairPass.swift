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
    /// Where the pass's lines go, as they come: qemu-img prints them as it
    /// goes, so a repair that fails shows what led up to it.
    let emit: ([String]) -> Void

    /// What the repairing pass fixed.
    struct Fixed {
        var leaks = 0
        var corruptions = 0
    }

    /// `-r leaks` met refcounts only a rebuild (`-r all`) can fix.
    struct RebuildNeeded: Error {}

    /// A repair that could not be carried out (qemu-img's "Check failed").
    struct RepairFailed: Error {
        var error: BlockError
    }

    /// Repairs what `before` (a check of the image as it was) found.
    func run(before: QCOW2Checker.Report) -> EventLoopFuture<Fixed> {
        // Entries `-r all` dropped from the end of the snapshot table as it
        // read it: the header counts the rest first, as qemu-img writes it.
        let dropped = driver.overhangingSnapshots
        guard all, dropped > 0 else { return repair(before: before, fixed: Fixed()) }
        return driver.writeSnapshotCount(file: file).flatMapErrorThrowing { error in
            throw RepairFailed(error: error as? BlockError ?? .eio)
        }.flatMap {
            repair(before: before, fixed: Fixed(corruptions: dropped))
        }
    }

    /// The repairs after the snapshot count's, counted on from `fixed`.
    private func repair(before: QCOW2Checker.Report, fixed: Fixed) -> EventLoopFuture<Fixed> {
        // What the pass prints before the refcount comparison, line by line
        // of `before`: the snapshot table is repaired (by `-r all`) as it is
        // found.
        var lines = before.messages[..<before.mismatchMessagesStart].map {
            [all && $0.hasPrefix("ERROR snapshot table entry ") ? "Repairing" + $0.dropFirst("ERROR".count) : $0]
        }
        guard all else { return repairRefcounts(found: before, leadingLines: lines.flatMap { $0 }, fixed: fixed) }
        // qemu-img's pass rewrites misaligned entries without data as its
        // walk meets them, so it counts neither their clusters nor their
        // second sighting in a shared table: rewritten first here, and the
        // image checked again for what the refcount repair is to find.
        var fixes: [QCOW2Checker.EntryFix] = []
        var seen: Set<UInt64> = []
        for (fix, messageIndex, countingMessages) in before.preallocatedFixes {
            if seen.insert(fix.entryOffset).inserted {
                fixes.append(fix)
                lines[messageIndex] = ["Repairing" + before.messages[messageIndex].dropFirst("ERROR".count)]
            } else {
                lines[messageIndex] = []
            }
            // Fixed, the entry's cluster is not counted at all.
            for index in messageIndex + 1..<messageIndex + 1 + countingMessages { lines[index] = [] }
        }
        // It also grows the file over a refcount block past its end, which
        // Strata does not do: a damaged entry may point anywhere. Only where
        // its attempt must fail, its lines are the same.
        let clusterSize = UInt64(driver.header.clusterSize)
        for (block, offset, messageIndex) in before.blocksOutsideImage where offset > UInt64(Int64.max) - clusterSize {
            lines[messageIndex] = ["Repairing refcount block \(block) is outside image",
                                   "ERROR could not resize image: Invalid argument"]
        }
        guard !fixes.isEmpty else {
            return repairRefcounts(found: before, leadingLines: lines.flatMap { $0 }, fixed: fixed)
        }
        return driver.repairEntries(fixes, file: file).flatMap {
            QCOW2Checker(driver: driver, file: file).run()
        }.flatMapErrorThrowing { error in
            emit(lines.flatMap { $0 })
            throw RepairFailed(error: error as? BlockError ?? .eio)
        }.flatMap { rechecked in
            repairRefcounts(found: rechecked, leadingLines: lines.flatMap { $0 },
                            fixed: Fixed(leaks: fixed.leaks, corruptions: fixed.corruptions + fixes.count))
        }
    }

    /// Whether the refcount structure, which could not be loaded, must be
    /// rebuilt: always, but for blocks beyond any offset a file reaches,
    /// which qemu-img rebuilds only under `-r all` (its attempt to grow
    /// the file over them fails).
    private var damageNeedsRebuild: Bool {
        guard let damage = driver.refcountDamage else { return false }
        if case .blockMisplaced(let offset) = damage, offset % UInt64(driver.header.clusterSize) == 0 { return all }
        return true
    }

    /// Whether a refcount block is not cluster-aligned.
    private var misalignedBlock: Bool {
        guard case .blockMisplaced(let offset)? = driver.refcountDamage else { return false }
        return offset % UInt64(driver.header.clusterSize) != 0
    }

    /// The refcount repair, then the COPIED and snapshot table repairs:
    /// `found` is a check of the image as the walk's repairs left it,
    /// `leadingLines` what the pass prints before the refcount comparison.
    private func repairRefcounts(found before: QCOW2Checker.Report, leadingLines: [String],
                                 fixed: Fixed) -> EventLoopFuture<Fixed> {
        var fixed = fixed
        emit(leadingLines + before.messages[before.mismatchMessagesStart..<before.copiedMessagesStart])
        // Refcounts that cannot be repaired in place (a structure that could
        // not be loaded, a block sharing its cluster, a cluster in use
        // counted 0) are rebuilt by `-r all`; `-r leaks` gives up with
        // qemu-img's error and status. (qemu-img repairs the leaks it found
        // first; Strata writes nothing to an image it cannot make consistent.)
        let rebuild = damageNeedsRebuild || before.refcountsNeedRebuild
        let refcountsRepaired: EventLoopFuture<Void>
        if rebuild {
            guard all else {
                // qemu-img marked the image corrupt on reading a misaligned
                // block (the checker printed its words).
                guard misalignedBlock else { return file.eventLoop.makeFailedFuture(RebuildNeeded()) }
                return driver.setCorruptBit(file: file).flatMapThrowing { throw RebuildNeeded() }
            }
            emit(["Rebuilding refcount structure"])
            refcountsRepaired = driver.rebuildRefcounts(file: file).flatMap { freed in
                QCOW2Checker(driver: driver, file: file).run().map { (freed, $0) }
            }.flatMap { freed, rebuilt in
                // qemu-img walks the metadata again over the new structure,
                // printing what the walk finds, then compares, repairing
                // leaks only: the old structure's clusters, one line each.
                emit(Array(rebuilt.messages[rebuilt.walkMessagesStart..<rebuilt.mismatchMessagesStart]))
                let lines = freed.map { ($0.cluster, $0.message(repairing: true)) }
                    + rebuilt.mismatches.map { ($0.cluster, $0.message(repairing: $0.stored > $0.referenced)) }
                emit(lines.sorted { $0.0 < $1.0 }.map(\.1))
                if rebuilt.refcountsNeedRebuild { emit(["ERROR rebuilt refcount structure is still broken"]) }
                return driver.repairRefcounts(file: file)
            }
        } else {
            if before.refcountCorruptions > 0 || before.leaks > 0 {
                // The comparison again, repairing: the refcounts it cannot
                // get are told again (the corruption event is not).
                var mismatches = before.mismatches.makeIterator()
                emit(before.messages[before.mismatchMessagesStart..<before.copiedMessagesStart].compactMap { line in
                    if line.hasPrefix("Can't get refcount ") { return line }
                    if line.hasPrefix("qcow2: ") { return nil }
                    return mismatches.next().map { $0.message(repairing: $0.stored > $0.referenced || all) }
                })
            }
            if driver.refcountDamage != nil {
                // Blocks out of reach, under -r leaks: qemu-img repairs
                // the leaks elsewhere; Strata, without the structure
                // loaded, only when there are none.
                guard before.leaks == 0 else { return file.eventLoop.makeFailedFuture(RebuildNeeded()) }
                refcountsRepaired = file.eventLoop.makeSucceededVoidFuture()
            } else {
                refcountsRepaired = driver.repairRefcounts(file: file, onlyLeaks: !all)
            }
        }
        return refcountsRepaired.flatMap {
            QCOW2Checker(driver: driver, file: file).run()
        }.flatMap { middle in
            // What the refcount repair took away (never less than nothing:
            // qemu-img counts each fix as it makes it).
            fixed.leaks += max(0, before.leaks - middle.leaks)
            fixed.corruptions += max(0, before.refcountCorruptions - middle.refcountCorruptions)
            let repairCopied = all || (middle.refcountCorruptions == 0 && middle.leaks == 0 && middle.checkErrors == 0)
            var lines = middle.messages[middle.copiedMessagesStart...].map {
                repairCopied && $0.hasPrefix("ERROR ") ? "Repairing " + $0.dropFirst("ERROR ".count) : $0
            }
            guard repairCopied, !middle.copiedFixes.isEmpty else {
                emit(lines)
                return file.eventLoop.makeSucceededVoidFuture()
            }
            // Each COPIED line is one fix. An L2 table two L1 entries name
            // is fixed on the first visit, so qemu-img finds nothing more
            // on the second: its entries are told and counted once.
            var seen: Set<UInt64> = []
            let unique = middle.copiedFixes.indices.filter { seen.insert(middle.copiedFixes[$0].entryOffset).inserted }
            lines = unique.map { lines[$0] }
            let fixes = unique.map { middle.copiedFixes[$0] }
            // Fixed one by one, qemu-img stops at the first that would write
            // into another structure.
            if let overlap = driver.firstOverlappingFix(fixes) {
                lines = Array(lines.prefix(overlap.index + 1))
            }
            emit(lines)
            return driver.repairEntries(fixes, file: file).map {
                fixed.corruptions += fixes.count
            }
        }.flatMap {
            let snapshotFixes = before.incompleteSnapshots + before.droppedSnapshotExtraData
            guard all, snapshotFixes > 0 else { return file.eventLoop.makeSucceededVoidFuture() }
            return driver.rewriteSnapshotTable(file: file).map {
                fixed.corruptions += snapshotFixes
            }
        }.flatMapErrorThrowing { error in
            throw RepairFailed(error: error as? BlockError ?? .eio)
        }.map { fixed }
    }
}
