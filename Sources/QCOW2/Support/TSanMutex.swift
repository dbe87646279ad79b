#if QCOW2_TSAN_LOCKS
// ThreadSanitizer builds only (scripts/sanitize.sh passes -DQCOW2_TSAN_LOCKS).
//
// Synchronization.Mutex takes its lock with atomics inside the prebuilt, uninstrumented
// Synchronization library, so TSan does not see the lock: every access to state it
// protects is reported as a race (checked with a two-thread program that only touches a
// dictionary inside `withLock`). This module-level `Mutex` shadows it in this module with
// the same `withLock` shape over a pthread mutex, which TSan understands, so that what it
// reports are real races. Release builds never compile this file's contents.

/// A pthread-mutex stand-in for `Synchronization.Mutex` (TSan builds).
final class Mutex<Value>: @unchecked Sendable {
    private let lock = Lock()
    private var value: Value

    init(_ initialValue: Value) { value = initialValue }

    func withLock<Result>(_ body: (inout Value) throws -> Result) rethrows -> Result {
        try lock.withLock { try body(&value) }
    }
}
#endif
