#!/usr/bin/env bash
# fuzz.sh — build and run the libFuzzer targets in Fuzz/ (Linux, swiftc -sanitize=fuzzer).
#
# Targets (Fuzz/Targets/Fuzz<Name>.swift, seeds in Fuzz/corpus/<name>/):
#   header        QCOW2Header.parse (+ serialize/parse round trip)
#   image-header  ImageHeader.parse: cluster 0 with extensions and backing name
#   l2-entry      L2Entry.clusterKind / subclusterType, CompressedDescriptor, fuzzed geometry
#   refcount      RefcountBlockCodec get/set on every width
#   snapshot      SnapshotTableEntry.parseTable (+ serialize/parse)
#   image         a whole image through the engine (DiskImage.open, read, allocationMap,
#                 snapshots, read-only ImageCheck); links Sources/QCOW2 + QCOW2Format,
#                 the CQCOW2System shim, zlib and zstd
#   image-write   the same images opened read-write: writes, zero writes, discard,
#                 compressed write, flush, snapshot create/delete, then `check -r all`
#                 (seeds: Fuzz/corpus/image/)
#   luks-header   LUKS1Header(parsing:areaLength:) (+ serialize/parse, cheap unlock); compiles
#                 Sources/QCOW2Crypto into the fuzzer, links the system libcrypto
#   nbd-decoder   NBDFrameDecoder on a client byte stream, split into two reads, through
#                 NIO's ByteToMessageHandler on an EmbeddedChannel; links the NIOCore
#                 objects of the SwiftPM debug build (run `swift build` first)
# The format targets compile Sources/QCOW2Format/*.swift straight into the fuzzer; the
# image target builds QCOW2Format and QCOW2 as modules first. All with AddressSanitizer
# (FUZZ_SANITIZERS=fuzzer to turn it off).
#
# Usage:
#   scripts/fuzz.sh [TARGET...]                 build + run (default: all targets)
#   FUZZ_SECONDS=300 scripts/fuzz.sh image      longer run of one target
#   BUILD_ONLY=1 scripts/fuzz.sh                build only
#   scripts/fuzz.sh -- header CRASHFILE         (after `--`: run one binary on inputs,
#                                                e.g. to reproduce a crash)
#
# Environment (defaults in brackets):
#   FUZZ_SECONDS     seconds per target                     [30]
#   FUZZ_DIR         scratch: binaries, working corpora, crashes  [<repo>/.build-fuzz]
#   FUZZ_JOBS        parallel fuzzing processes per target  [1]
#   FUZZ_SANITIZERS  swiftc -sanitize= value                [fuzzer,address]
#   FUZZ_OPT         swiftc optimisation flag               [-O]
#   FUZZ_ARGS        extra libFuzzer arguments              []
#
# Each run starts from Fuzz/corpus/<target>/ plus the working corpus kept in
# $FUZZ_DIR/corpus/<target>/ from earlier runs; crashes land in
# $FUZZ_DIR/crashes/<target>/ (crash-*, timeout-*, oom-*), and the script exits 1 when a
# target found one. Minimize one with:
#   .build-fuzz/bin/fuzz-<target> -minimize_crash=1 -runs=20000 CRASHFILE
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FUZZ_SECONDS="${FUZZ_SECONDS:-30}"
FUZZ_DIR="${FUZZ_DIR:-$ROOT/.build-fuzz}"
FUZZ_JOBS="${FUZZ_JOBS:-1}"
FUZZ_SANITIZERS="${FUZZ_SANITIZERS:-fuzzer,address}"
FUZZ_OPT="${FUZZ_OPT:--O}"
FUZZ_ARGS="${FUZZ_ARGS:-}"
ALL_TARGETS=(header image-header l2-entry refcount snapshot image image-write luks-header nbd-decoder)

# target name -> source file, and per-target libFuzzer options
source_of() {
  case "$1" in
    header) echo FuzzHeader.swift ;;
    image-header) echo FuzzImageHeader.swift ;;
    l2-entry) echo FuzzL2Entry.swift ;;
    refcount) echo FuzzRefcountBlock.swift ;;
    snapshot) echo FuzzSnapshotTable.swift ;;
    image) echo FuzzImage.swift ;;
    image-write) echo FuzzImageWrite.swift ;;
    luks-header) echo FuzzLUKSHeader.swift ;;
    nbd-decoder) echo FuzzNBDDecoder.swift ;;
    *) echo "unknown target: $1 (targets: ${ALL_TARGETS[*]})" >&2; exit 2 ;;
  esac
}
options_of() {
  case "$1" in
    header) echo "-max_len=512" ;;
    image-header) echo "-max_len=8192" ;;
    l2-entry) echo "-max_len=1024" ;;
    refcount) echo "-max_len=70000" ;;
    snapshot) echo "-max_len=16384" ;;
    image|image-write) echo "-max_len=262144 -rss_limit_mb=2048 -malloc_limit_mb=1024 -timeout=20" ;;
    luks-header) echo "-max_len=300000 -rss_limit_mb=2048 -malloc_limit_mb=512 -timeout=5" ;;
    nbd-decoder) echo "-max_len=65536 -rss_limit_mb=2048 -malloc_limit_mb=256 -timeout=5" ;;
  esac
}
corpus_of() { # seed directory
  case "$1" in
    image-write) echo "$ROOT/Fuzz/corpus/image" ;;
    *) echo "$ROOT/Fuzz/corpus/$1" ;;
  esac
}

SWIFTC="${SWIFTC:-swiftc}"
CLANG="${CLANG:-$(dirname "$(command -v "$SWIFTC")")/clang}"
[ -x "$CLANG" ] || CLANG=clang
SAN=(-sanitize="$FUZZ_SANITIZERS")
CSAN="-fsanitize=${FUZZ_SANITIZERS/fuzzer/fuzzer-no-link}"
COMMON=("$FUZZ_OPT" -g -parse-as-library -swift-version 6)
# lld: gold prints a warning per ASan symbol
LINK=()
command -v "$(dirname "$(command -v "$SWIFTC")")/ld.lld" > /dev/null 2>&1 && LINK=(-use-ld=lld)

BIN="$FUZZ_DIR/bin"
OBJ="$FUZZ_DIR/obj"
mkdir -p "$BIN" "$OBJ"

newer_than() { # newer_than OUTPUT INPUT... : true when OUTPUT is missing or older than an input
  local out="$1"; shift
  [ -e "$out" ] || return 0
  local f
  for f in "$@"; do [ "$f" -nt "$out" ] && return 0; done
  return 1
}

FORMAT_SOURCES=("$ROOT"/Sources/QCOW2Format/*.swift)

build_format_target() { # a pure-Swift target: QCOW2Format compiled into the fuzzer itself
  local t="$1" src
  src="$ROOT/Fuzz/Targets/$(source_of "$t")"
  local out="$BIN/fuzz-$t"
  # The harness says `import QCOW2Format`; compiled into one module, that import must go.
  local harness="$OBJ/$t-harness.swift"
  sed '/^import QCOW2Format$/d' "$src" > "$harness.tmp"
  if ! cmp -s "$harness.tmp" "$harness" 2>/dev/null; then mv "$harness.tmp" "$harness"; else rm -f "$harness.tmp"; fi
  if newer_than "$out" "${FORMAT_SOURCES[@]}" "$harness"; then
    echo "== building fuzz-$t"
    "$SWIFTC" "${SAN[@]}" "${COMMON[@]}" "${LINK[@]}" -module-name QCOW2Format "${FORMAT_SOURCES[@]}" "$harness" -o "$out"
  fi
}

build_engine_modules() { # QCOW2Format, QCOW2Crypto and QCOW2 as modules, the C shim as an object
  local mod="$OBJ/modules"
  mkdir -p "$mod/CQCOW2System"
  cat > "$mod/CQCOW2System/module.modulemap" <<EOF
module CQCOW2System {
    header "$ROOT/Sources/CQCOW2System/include/CQCOW2System.h"
    export *
}
EOF
  local engine_sources=()
  while IFS= read -r f; do engine_sources+=("$f"); done < <(find "$ROOT/Sources/QCOW2" -name '*.swift' | sort)
  if newer_than "$OBJ/libQCOW2Format.a" "${FORMAT_SOURCES[@]}"; then
    echo "== building QCOW2Format (module)"
    (cd "$OBJ" && "$SWIFTC" "${SAN[@]}" "${COMMON[@]}" -module-name QCOW2Format -emit-module -emit-module-path "$mod/QCOW2Format.swiftmodule" \
      -emit-library -static -o "$OBJ/libQCOW2Format.a" "${FORMAT_SOURCES[@]}")
  fi
  if newer_than "$OBJ/shims.o" "$ROOT/Sources/CQCOW2System/shims.c"; then
    echo "== building CQCOW2System shim"
    "$CLANG" -c -O1 -g -D_GNU_SOURCE "$CSAN" -I "$ROOT/Sources/CQCOW2System/include" \
      "$ROOT/Sources/CQCOW2System/shims.c" -o "$OBJ/shims.o"
  fi
  local crypto_sources=("$ROOT"/Sources/QCOW2Crypto/*.swift)
  if newer_than "$OBJ/libQCOW2Crypto.a" "${crypto_sources[@]}"; then
    echo "== building QCOW2Crypto (module)"
    (cd "$OBJ" && "$SWIFTC" "${SAN[@]}" "${COMMON[@]}" -module-name QCOW2Crypto -I "$ROOT/Sources/COpenSSL" \
      -emit-module -emit-module-path "$mod/QCOW2Crypto.swiftmodule" \
      -emit-library -static -o "$OBJ/libQCOW2Crypto.a" "${crypto_sources[@]}")
  fi
  if newer_than "$OBJ/libQCOW2.a" "${engine_sources[@]}" "$OBJ/libQCOW2Format.a" "$OBJ/libQCOW2Crypto.a"; then
    echo "== building QCOW2 (module, ${#engine_sources[@]} files)"
    (cd "$OBJ" && "$SWIFTC" "${SAN[@]}" "${COMMON[@]}" -module-name QCOW2 -I "$mod" \
      -Xcc -fmodule-map-file="$mod/CQCOW2System/module.modulemap" \
      -I "$ROOT/Sources/CZlib" -I "$ROOT/Sources/CZstd" -I "$ROOT/Sources/COpenSSL" \
      -emit-module -emit-module-path "$mod/QCOW2.swiftmodule" \
      -emit-library -static -o "$OBJ/libQCOW2.a" "${engine_sources[@]}")
  fi
}

build_image_target() { # a target over the engine: links the QCOW2 and QCOW2Format modules
  local t="$1"
  build_engine_modules
  local mod="$OBJ/modules" src out="$BIN/fuzz-$t"
  src="$ROOT/Fuzz/Targets/$(source_of "$t")"
  if newer_than "$out" "$src" "$ROOT/Fuzz/Targets/Shared/FuzzInputFile.swift" "$OBJ/libQCOW2.a" "$OBJ/libQCOW2Format.a" "$OBJ/libQCOW2Crypto.a" "$OBJ/shims.o"; then
    echo "== building fuzz-$t"
    "$SWIFTC" "${SAN[@]}" "${COMMON[@]}" "${LINK[@]}" -module-name FuzzTarget -I "$mod" \
      -Xcc -fmodule-map-file="$mod/CQCOW2System/module.modulemap" \
      -I "$ROOT/Sources/CZlib" -I "$ROOT/Sources/CZstd" -I "$ROOT/Sources/COpenSSL" \
      "$src" "$ROOT/Fuzz/Targets/Shared/FuzzInputFile.swift" "$OBJ/libQCOW2.a" "$OBJ/libQCOW2Crypto.a" "$OBJ/libQCOW2Format.a" \
      "$OBJ/shims.o" -lz -lzstd -lcrypto -o "$out"
  fi
}

build_crypto_target() { # QCOW2Crypto compiled into the fuzzer, the system libcrypto linked
  local t="$1" src out="$BIN/fuzz-$1"
  src="$ROOT/Fuzz/Targets/$(source_of "$t")"
  local crypto_sources=("$ROOT"/Sources/QCOW2Crypto/*.swift)
  local harness="$OBJ/$t-harness.swift"
  sed '/^import QCOW2Crypto$/d' "$src" > "$harness.tmp"
  if ! cmp -s "$harness.tmp" "$harness" 2>/dev/null; then mv "$harness.tmp" "$harness"; else rm -f "$harness.tmp"; fi
  if newer_than "$out" "${crypto_sources[@]}" "$harness"; then
    echo "== building fuzz-$t"
    "$SWIFTC" "${SAN[@]}" "${COMMON[@]}" "${LINK[@]}" -module-name QCOW2Crypto -I "$ROOT/Sources/COpenSSL" \
      "${crypto_sources[@]}" "$harness" -lcrypto -o "$out"
  fi
}

build_nbd_target() { # NBDFrameDecoder + wire constants compiled into the fuzzer; NIO from .build/debug
  local t="$1" src out="$BIN/fuzz-$1"
  src="$ROOT/Fuzz/Targets/$(source_of "$t")"
  local dbg="$ROOT/.build/debug"
  local list="$dbg/swift-qcow2PackageTests.product/Objects.LinkFileList"
  [ -f "$list" ] || { echo "nbd-decoder links SwiftNIO from the SwiftPM build: run \`swift build --build-tests\` first" >&2; exit 2; }
  local sources=("$ROOT/Sources/NBDServer/NBDFrameDecoder.swift" "$ROOT/Sources/NBDServer/NBDProtocol.swift")
  # The NBD namespace is declared in NBDServer.swift, which pulls in the whole server.
  printf '// generated by scripts/fuzz.sh: the namespace of NBDProtocol.swift\npublic enum NBD {}\n' > "$OBJ/nbd-namespace.swift"
  # NIOCore, NIOEmbedded and their dependencies: the objects SwiftPM linked into the tests.
  local objects=()
  while IFS= read -r f; do
    f="${f//\'/}"
    case "$f" in
      */NIOCore.build/*|*/NIOEmbedded.build/*|*/NIOConcurrencyHelpers.build/*|*/_NIODataStructures.build/*|\
      */_NIOBase64.build/*|*/Atomics.build/*|*/_AtomicsShims.build/*|*/CNIO*.build/*|*/DequeModule.build/*|\
      */InternalCollectionsUtilities.build/*|*/ContainersPreview.build/*) objects+=("$f") ;;
    esac
  done < "$list"
  local maps=()
  for m in "$dbg"/CNIO*.build/module.modulemap "$ROOT"/.build/checkouts/swift-atomics/Sources/_AtomicsShims/include/module.modulemap; do
    [ -f "$m" ] && maps+=(-Xcc -fmodule-map-file="$m")
  done
  if newer_than "$out" "$src" "${sources[@]}" "$list"; then
    echo "== building fuzz-$t"
    "$SWIFTC" "${SAN[@]}" "${COMMON[@]}" "${LINK[@]}" -module-name FuzzNBD -I "$dbg/Modules" "${maps[@]}" \
      "${sources[@]}" "$OBJ/nbd-namespace.swift" "$src" "${objects[@]}" -o "$out"
  fi
}

build() {
  case "$1" in
    image|image-write) build_image_target "$1" ;;
    luks-header) build_crypto_target "$1" ;;
    nbd-decoder) build_nbd_target "$1" ;;
    *) build_format_target "$1" ;;
  esac
}

if [ "${1:-}" = "--" ]; then
  shift
  t="$1"; shift
  build "$t"
  exec "$BIN/fuzz-$t" $(options_of "$t") "$@"
fi

TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=("${ALL_TARGETS[@]}")
for t in "${TARGETS[@]}"; do source_of "$t" > /dev/null; build "$t"; done
[ "${BUILD_ONLY:-0}" = 1 ] && exit 0

status=0
SUMMARY=()
for t in "${TARGETS[@]}"; do
  work="$FUZZ_DIR/corpus/$t" crashes="$FUZZ_DIR/crashes/$t" log="$FUZZ_DIR/logs/$t.log"
  mkdir -p "$work" "$crashes" "$(dirname "$log")"
  seeds=()
  [ -d "$(corpus_of "$t")" ] && seeds=("$(corpus_of "$t")")
  dict=()
  [ -f "$ROOT/Fuzz/qcow2.dict" ] && dict=(-dict="$ROOT/Fuzz/qcow2.dict")
  before=$(find "$crashes" -type f | wc -l)
  jobs=()
  [ "$FUZZ_JOBS" -gt 1 ] && jobs=(-jobs="$FUZZ_JOBS" -workers="$FUZZ_JOBS")
  run="$FUZZ_DIR/run/$t"  # libFuzzer's cwd (-jobs writes fuzz-N.log there)
  rm -rf "$run"; mkdir -p "$run"
  echo "== fuzzing $t for ${FUZZ_SECONDS}s (log: $log)"
  set +e
  (cd "$run" && "$BIN/fuzz-$t" $(options_of "$t") "${dict[@]}" -max_total_time="$FUZZ_SECONDS" \
    -print_final_stats=1 -artifact_prefix="$crashes/" "${jobs[@]}" \
    $FUZZ_ARGS "$work" "${seeds[@]}" > "$log" 2>&1)
  rc=$?
  set -e
  cat "$run"/fuzz-*.log >> "$log" 2>/dev/null || true
  runs=$(grep -h 'stat::number_of_executed_units' "$log" | awk '{s+=$2} END {print s+0}' || true)
  speed=$(grep -h 'stat::average_exec_per_sec' "$log" | awk '{s+=$2} END {print s+0}' || true)
  cov=$(grep -hoE 'cov: [0-9]+' "$log" | tail -1 | awk '{print $2}' || true)
  after=$(find "$crashes" -type f | wc -l)
  found=$((after - before))
  SUMMARY+=("$(printf '%-13s %10s execs  %7s exec/s  cov %6s  new crashes %d  (exit %d)' "$t" "$runs" "$speed" "${cov:-?}" "$found" "$rc")")
  if [ "$found" -gt 0 ] || [ "$rc" -ne 0 ]; then
    status=1
    grep -hE '==ERROR|Fatal error|SUMMARY|Test unit written|^    #[0-9]+ ' "$log" | head -40 || true
  fi
done
echo "== summary (${FUZZ_SECONDS}s per target)"
printf '%s\n' "${SUMMARY[@]}"
exit $status
