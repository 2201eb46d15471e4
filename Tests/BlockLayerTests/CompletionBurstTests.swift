import BlockLayer
import Testing

/// Listeners are told once, when the outermost burst ends.
@Suite struct CompletionBurstTests {
    final class Recorder: CompletionBurstListener {
        var told = 0
        var onEnd: (() -> Void)?
        func completionBurstEnded() {
            told += 1
            onEnd?()
        }
    }

    @Test func listenersAreToldOnceWhenTheOutermostBurstEnds() {
        let burst = CompletionBurst()
        let first = Recorder()
        let second = Recorder()
        #expect(!burst.notifyWhenEnded(first), "no burst is running")
        burst.run {
            #expect(burst.notifyWhenEnded(first))
            burst.run {
                #expect(burst.notifyWhenEnded(second))
            }
            #expect(second.told == 0, "an inner burst does not end the outer one")
        }
        #expect(first.told == 1 && second.told == 1)
        burst.run {}
        #expect(first.told == 1 && second.told == 1, "nobody asked again")
    }

    @Test func aBurstStartedWhileTellingJoinsTheSameList() {
        let burst = CompletionBurst()
        let first = Recorder()
        let late = Recorder()
        // The first listener's flush completes more I/O, whose reply asks too.
        first.onEnd = {
            burst.run { _ = burst.notifyWhenEnded(late) }
            #expect(late.told == 0, "told after the first, by the outer run")
        }
        burst.run { _ = burst.notifyWhenEnded(first) }
        #expect(first.told == 1 && late.told == 1)
        #expect(!burst.isRunning)
    }
}
