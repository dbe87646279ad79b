#!/usr/bin/env bash
# sanitize.sh — build the test targets under AddressSanitizer and ThreadSanitizer and
# run the test subsets where each sanitizer can find something.
#
#   asan  swift build --build-tests --sanitize=address  (scratch: .build-asan)
#         runs the parsers and hostile-image tests: format structures, malformed
#         images, fuzzing regressions, check (memory safety of unsafe-pointer code
#         on untrusted input)
#   tsan  swift build --build-tests --sanitize=thread   (scratch: .build-tsan)
#         runs the tests that use threads: library concurrency and the NBD server
#         (data races in caches, locks and the NIO/thread-pool hand-off); known reports
#         in dependencies are suppressed in scripts/tsan-suppressions.txt
#
# The two builds use their own scratch paths so they never disturb the normal .build
# (.gitignore covers .build-*/). A sanitizer report makes the test process fail, and
# the full log of each phase is kept in $LOG_DIR.
#
# Usage:
#   scripts/sanitize.sh              both phases
#   scripts/sanitize.sh asan         one phase (asan | tsan)
#   SKIP_BUILD=1 scripts/sanitize.sh tsan    re-run tests on an existing build
#
# Environment (defaults in brackets):
#   ASAN_FILTER  swift test --filter for the ASan phase
#                [QCOW2FormatTests|Malformed|CrashFuzz|Check]
#   TSAN_FILTER  swift test --filter for the TSan phase  [Concurrency|NBDServerTests]
#   ASAN_SKIP    swift test --skip for the ASan phase     [boundedMemory: it limits the
#                child's resident set, which ASan's shadow memory and quarantine inflate]
#   TSAN_SKIP    swift test --skip for the TSan phase     [(none)]
#   JOBS         swift build -j                         [nproc]
#   LOG_DIR      where the logs go                      [<repo>/.build-sanitize-logs]
#   SKIP_BUILD   1 = only run the tests                 [0]
#
# Exit status: 0 when every phase built and its tests passed, 1 otherwise.
set -uo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
cd "$REPO_ROOT" || exit 1

case "${1:-}" in -h|--help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac

ASAN_FILTER=${ASAN_FILTER:-'QCOW2FormatTests|Malformed|CrashFuzz|Check'}
TSAN_FILTER=${TSAN_FILTER:-'Concurrency|NBDServerTests'}
ASAN_SKIP=${ASAN_SKIP-boundedMemory}
TSAN_SKIP=${TSAN_SKIP-}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}
LOG_DIR=${LOG_DIR:-$REPO_ROOT/.build-sanitize-logs}
SKIP_BUILD=${SKIP_BUILD:-0}
mkdir -p "$LOG_DIR"

PHASES=("$@")
[ ${#PHASES[@]} -eq 0 ] && PHASES=(asan tsan)

# Sanitizer runtime options. Reports go to files ($LOG_DIR/<phase>-report.<pid>) as well
# as being fatal: the tests also run our `qcow2` binary (the sanitized one, via
# QCOW2_BIN) as a child process, whose stderr a test may only inspect for an exit status,
# so the files are what the script checks. exitcode=66: a child stopped by a report must
# not look like qcow2's clean "exit 1" refusal. detect_leaks=0: the Swift runtime keeps
# metadata caches for the process lifetime, which LSan reports as leaks.
asan_defaults="detect_leaks=0:halt_on_error=1:exitcode=66:log_path=$LOG_DIR/asan-report"
tsan_defaults="halt_on_error=1:exitcode=66:second_deadlock_stack=1:log_path=$LOG_DIR/tsan-report"
tsan_defaults="$tsan_defaults:suppressions=$SCRIPT_DIR/tsan-suppressions.txt"
export ASAN_OPTIONS=${ASAN_OPTIONS:-$asan_defaults}
export TSAN_OPTIONS=${TSAN_OPTIONS:-$tsan_defaults}

status=0
for phase in "${PHASES[@]}"; do
    case "$phase" in
        asan) sanitizer=address; filter=$ASAN_FILTER; skip=$ASAN_SKIP; defines=() ;;
        # Swap Synchronization.Mutex (invisible to TSan) for a pthread stand-in: see
        # Sources/QCOW2/Support/TSanMutex.swift.
        tsan) sanitizer=thread; filter=$TSAN_FILTER; skip=$TSAN_SKIP; defines=(-Xswiftc -DQCOW2_TSAN_LOCKS) ;;
        *) echo "sanitize.sh: unknown phase '$phase' (asan | tsan)" >&2; exit 2 ;;
    esac
    scratch=".build-$phase"
    log="$LOG_DIR/$phase.log"
    : > "$log"
    echo "== $phase: build (--sanitize=$sanitizer, --scratch-path $scratch), log $log"
    if [ "$SKIP_BUILD" != 1 ]; then
        start=$(date +%s)
        if ! swift build --build-tests --sanitize="$sanitizer" --scratch-path "$scratch" \
            "${defines[@]}" -j "$JOBS" >>"$log" 2>&1; then
            echo "   build FAILED (see $log)"; tail -20 "$log"; status=1; continue
        fi
        echo "   built in $(( $(date +%s) - start )) s"
    fi
    echo "== $phase: swift test --filter '$filter'"
    rm -f "$LOG_DIR/$phase-report".*
    start=$(date +%s)
    if QCOW2_BIN="$REPO_ROOT/$scratch/debug/qcow2" swift test --skip-build --disable-xctest --sanitize="$sanitizer" \
        --scratch-path "$scratch" "${defines[@]}" --filter "$filter" ${skip:+--skip "$skip"} >>"$log" 2>&1; then
        echo "   tests passed in $(( $(date +%s) - start )) s"
    else
        echo "   tests FAILED in $(( $(date +%s) - start )) s (see $log)"; status=1
    fi
    # Surface sanitizer reports even if a test harness swallowed the exit status.
    reports=$(ls "$LOG_DIR/$phase-report".* 2>/dev/null)
    if [ -n "$reports" ]; then
        echo "   $phase: sanitizer reports in:"; echo "$reports" | sed 's/^/     /'
        grep -h -E "^(SUMMARY|WARNING|ERROR): " $reports | sort | uniq -c | head -20
        status=1
    fi
    grep -E "^(✔|✘|􀟈|􁁛|􀢄).*Test run with|Test run with" "$log" | tail -2
done
exit $status
