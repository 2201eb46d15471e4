/// The requests an I/O engine has handed to the kernel, by slot: each slot
/// holds the completion to run, and its index is the tag the kernel gives
/// back. Requests beyond the last free slot wait their turn, oldest first.
///
/// A class, not a struct: completions run from inside `complete`, and a
/// completion often takes a new slot at once.
final class CompletionSlots {
    /// Result of one I/O: bytes transferred, or a negative errno.
    typealias Completion = (Int) -> Void

    /// A completion in a struct: stored bare in an array, a closure is
    /// re-abstracted, which costs an allocation per request.
    private struct Slot {
        var completion: Completion?
    }

    let capacity: Int
    private var completions: [Slot]
    private var free: [Int]
    private var waiting: [() -> Void] = []

    init(capacity: Int) {
        self.capacity = capacity
        completions = Array(repeating: Slot(), count: capacity)
        free = Array((0..<capacity).reversed())
    }

    /// Slots not in use.
    var freeCount: Int { free.count }

    /// A free slot, now holding `completion`; nil when all are in use.
    func take(_ completion: @escaping Completion) -> Int? {
        guard let slot = free.popLast() else { return nil }
        completions[slot].completion = completion
        return slot
    }

    /// Runs `retry` once a slot frees (after `take` found none).
    func wait(_ retry: @escaping () -> Void) {
        waiting.append(retry)
    }

    /// Frees `slot` and runs its completion with `result`, then lets the
    /// oldest waiting request take the slot.
    func complete(_ slot: Int, result: Int) {
        let completion = completions[slot].completion
        completions[slot].completion = nil
        free.append(slot)
        completion?(result)
        if !waiting.isEmpty, !free.isEmpty {
            waiting.removeFirst()()
        }
    }
}
