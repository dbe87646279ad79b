#!/usr/bin/env bash
# bench-chain.sh — deep backing-chain benchmark: swift-qcow2 (`qcow2`) vs qemu-img.
#
# Builds qcow2 backing chains of several depths with qemu-img/qemu-io (cached in
# a work directory), then times, per depth, with REPS repetitions (medians):
#   convert   qcow2 convert -O raw TOP out   vs  qemu-img convert -O raw TOP out
#             vs the baselines `cat equivalent.raw > /dev/null` and
#             `cat equivalent.raw > out` (wall time, peak RSS, output checked
#             byte-for-byte against the equivalent raw image)
#   bench     qcow2 bench ... TOP  vs  qemu-img bench ... TOP (same arguments)
#   open1     `bench -c 1` (open the whole chain, one 4 KiB read, close)
#   info      qcow2 info TOP  vs  qemu-img info TOP
#   infochain qcow2 info --backing-chain TOP  vs  qemu-img info --backing-chain TOP
#
# See docs/BENCHMARKS.md for what each number means.
#
# Usage:
#   scripts/bench-chain.sh [DEPTH...]          (default: $DEPTHS)
#   DEPTHS="1 10 100" REPS=5 scripts/bench-chain.sh
#   BUILD_ONLY=1 DEPTHS=4096 scripts/bench-chain.sh   # pre-build a chain only
#
# Environment (defaults in brackets):
#   DEPTHS       chain depths to run            [1 10 100 300 500 1000 4096]
#   REPS         repetitions per measurement    [3]
#   WORK_DIR     chain cache + results          [<repo>/bench-work]
#   OUT_DIR      where convert outputs go       [/dev/shm/qcow2-bench.$$ if it has
#                                                room, else $WORK_DIR/out]
#   TIMEOUT      per-command timeout, seconds   [600]
#   QCOW2        our binary                     [.build/release/qcow2]
#   SKIP_BUILD   1 = don't run `swift build`    [0; also skipped when QCOW2 is set]
#   SKIP_QEMU    1 = don't time qemu-img        [0]
#   SKIP_OURS    1 = don't time qcow2           [0]
#   BUILD_ONLY   1 = build the chains and stop  [0]
#   BUILD_JOBS   parallel layer writers         [min(2, nproc)]
#   SEED         chain-layout seed              [1]
#   SHADOW       fraction of clusters that also have an older version in a
#                lower layer                    [0.5]
#   VSIZE_MIB    virtual size, MiB              [1024]
#   CLUSTER_KIB  cluster size, KiB              [64]
#   BENCH_SIZE   bench request size (-s)        [4096]
#   BENCH_STEP   bench step (-S)                [SIZE * odd(round(0.618 * VSIZE/SIZE))
#                                                = 663605248 for 1 GiB: scattered]
#   BENCH_COUNT  bench request count (-c)       [16384]
#   BENCH_QD     bench queue depth (-d)         [1]
#   OURS_BENCH_EXTRA  extra args for `qcow2 bench` only (e.g. "-t 2")   []
#
# Re-print (and merge) earlier runs without measuring anything:
#   scripts/bench-chain.sh --report bench-work/results/run-A.tsv bench-work/results/run-B.tsv
# For each depth the last file that has it wins.
set -uo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
cd "$REPO_ROOT" || exit 1

usage() { sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
case "${1:-}" in -h|--help) usage; exit 0 ;; esac

REPORT_ONLY=0
if [ "${1:-}" = --report ]; then
  shift; REPORT_ONLY=1
  [ "$#" -gt 0 ] || { echo "bench-chain: --report needs result .tsv files" >&2; exit 2; }
elif [ "$#" -gt 0 ]; then
  DEPTHS="$*"
fi
DEPTHS=${DEPTHS:-"1 10 100 300 500 1000 4096"}
REPS=${REPS:-3}
WORK_DIR=${WORK_DIR:-"$REPO_ROOT/bench-work"}
TIMEOUT=${TIMEOUT:-600}
SEED=${SEED:-1}
SHADOW=${SHADOW:-0.5}
VSIZE_MIB=${VSIZE_MIB:-1024}
CLUSTER_KIB=${CLUSTER_KIB:-64}
NPROC=$(nproc 2>/dev/null || echo 1)
BUILD_JOBS=${BUILD_JOBS:-$(( NPROC < 2 ? NPROC : 2 ))}
BENCH_SIZE=${BENCH_SIZE:-4096}
VSIZE_BYTES=$(( VSIZE_MIB * 1024 * 1024 ))
# Scattered reads: request i reads at (i * STEP) mod virtual-size in both
# qemu-img 7.2 (offset += step; offset %= image_size) and `qcow2 bench`.
# STEP = SIZE * k with k odd and close to 0.618 * (VSIZE / SIZE), so the
# requests form a golden-ratio (Weyl) sequence over the SIZE-aligned slots:
# successive reads land far apart, no slot repeats within VSIZE/SIZE requests,
# and no request straddles the end of the image. Later QEMU (2025 fix, commit
# ff2ab634) wraps modulo (size - bufsize) instead; for it use e.g.
# BENCH_STEP=69632 BENCH_COUNT=15421, which never wraps.
if [ -z "${BENCH_STEP:-}" ]; then
  _slots=$(( VSIZE_BYTES / BENCH_SIZE ))
  _k=$(( (_slots * 618034 + 500000) / 1000000 ))
  [ $(( _k % 2 )) -eq 0 ] && _k=$(( _k + 1 ))
  BENCH_STEP=$(( _k * BENCH_SIZE ))
fi
BENCH_COUNT=${BENCH_COUNT:-16384}
BENCH_QD=${BENCH_QD:-1}
OURS_BENCH_EXTRA=${OURS_BENCH_EXTRA:-}
SKIP_QEMU=${SKIP_QEMU:-0}
SKIP_OURS=${SKIP_OURS:-0}
BUILD_ONLY=${BUILD_ONLY:-0}

for t in qemu-img qemu-io /usr/bin/python3 /usr/bin/time timeout cmp; do
  command -v "$t" >/dev/null 2>&1 || { echo "bench-chain: missing required tool: $t" >&2; exit 1; }
done
PY=/usr/bin/python3
mkdir -p "$WORK_DIR" || exit 1
WORK_DIR=$(cd "$WORK_DIR" && pwd)

# ---------------------------------------------------------------- python helper
HELPER=$(mktemp "${TMPDIR:-/tmp}/bench-chain-helper.XXXXXX.py")
OUT_DIR_CREATED=""
cleanup() {
  rm -f "$HELPER"
  if [ -n "$OUT_DIR_CREATED" ]; then rm -rf "$OUT_DIR_CREATED"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cat >"$HELPER" <<'PYEOF'
import json, os, random, shutil, statistics, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor

def chain_name(depth, vsize_mib, cluster_kib, seed, shadow):
    return f"d{depth}-{vsize_mib}M-c{cluster_kib}k-seed{seed}-sh{shadow}"

def new_pattern(c, layer):   # newest version: bytes 1..127
    return 1 + (c * 31 + layer * 17) % 127

def old_pattern(c, layer):   # shadowed older version: bytes 129..255
    return 129 + (c * 31 + layer * 17) % 127

def cmd_build(work, depth, vsize_mib, cluster_kib, seed, shadow, jobs):
    depth, vsize_mib, cluster_kib, jobs = int(depth), int(vsize_mib), int(cluster_kib), int(jobs)
    shadow_f = float(shadow)
    cs = cluster_kib * 1024
    n = vsize_mib * 1024 * 1024 // cs
    final = os.path.join(work, chain_name(depth, vsize_mib, cluster_kib, seed, shadow))
    if os.path.exists(os.path.join(final, ".complete")):
        print(final)
        return
    t0 = time.time()
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)

    # Layout: every guest cluster's newest version lives in a layer chosen
    # uniformly from [0, depth); with probability SHADOW an older version of the
    # same cluster is also written in a uniformly chosen lower layer.
    rng = random.Random(f"bench-chain:{seed}:{depth}")
    newest = [0] * n
    older = [-1] * n
    per_layer = [[] for _ in range(depth)]
    for c in range(n):
        L = rng.randrange(depth)
        newest[c] = L
        per_layer[L].append((c, new_pattern(c, L)))
        if L > 0 and rng.random() < shadow_f:
            O = rng.randrange(L)
            older[c] = O
            per_layer[O].append((c, old_pattern(c, O)))
    for lst in per_layer:
        lst.sort()

    width = max(4, len(str(depth - 1)))
    names = [f"layer-{l:0{width}d}.qcow2" for l in range(depth)]

    def make_layer(l):
        # Each layer is created with its backing file recorded (-u: not opened)
        # and written with backing=null, so building layer 4095 never opens the
        # chain below it. Writes are whole clusters, so no copy-on-write is needed.
        args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}"]
        if l > 0:
            args += ["-u", "-b", names[l - 1], "-F", "qcow2"]
        args += [names[l], f"{vsize_mib}M"]
        r = subprocess.run(args, cwd=tmp, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"qemu-img create {names[l]} failed: {r.stderr.strip()}")
        if not per_layer[l]:
            return
        script = "".join(f"write -q -P {p} {c * cs} {cs}\n" for c, p in per_layer[l])
        spec = json.dumps({"driver": "qcow2",
                           "file": {"driver": "file", "filename": names[l]},
                           "backing": None})
        r = subprocess.run(["qemu-io", "-t", "unsafe", "json:" + spec], cwd=tmp,
                           input=script, capture_output=True, text=True)
        # qemu-io in stdin mode prints prompts to stdout; errors go to stdout or stderr.
        noise = (r.stdout.replace("qemu-io>", "").strip() + r.stderr.strip()).strip()
        if r.returncode != 0 or noise:
            raise RuntimeError(f"qemu-io on {names[l]} failed (rc {r.returncode}): {noise[:500]}")

    done = 0
    last = time.time()
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
        for _ in ex.map(make_layer, range(depth)):
            done += 1
            if time.time() - last > 10:
                last = time.time()
                print(f"  ... depth {depth}: {done}/{depth} layers written "
                      f"({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)

    # The equivalent raw image, computed from the layout (not by qemu-img, which
    # cannot read the deepest chains): every cluster holds its newest pattern.
    with open(os.path.join(tmp, "equivalent.raw"), "wb") as f:
        blocks = {}
        for c in range(n):
            p = new_pattern(c, newest[c])
            b = blocks.get(p)
            if b is None:
                b = blocks[p] = bytes([p]) * cs
            f.write(b)
    with open(os.path.join(tmp, "layout.json"), "w") as f:
        json.dump({"depth": depth, "clusters": n, "cluster_size": cs,
                   "newest_layer": newest, "older_layer": older,
                   "new_pattern": "1 + (c*31 + layer*17) % 127",
                   "old_pattern": "129 + (c*31 + layer*17) % 127"}, f, separators=(",", ":"))
    with open(os.path.join(tmp, "TOP"), "w") as f:
        f.write(names[-1] + "\n")
    info = {"depth": depth, "vsize_mib": vsize_mib, "cluster_kib": cluster_kib,
            "seed": seed, "shadow": shadow_f, "clusters": n,
            "shadowed_clusters": sum(1 for o in older if o >= 0),
            "empty_layers": sum(1 for lst in per_layer if not lst),
            "top": names[-1], "build_seconds": round(time.time() - t0, 1)}
    with open(os.path.join(tmp, ".complete"), "w") as f:
        json.dump(info, f, indent=1)
    os.rename(tmp, final)
    print(f"  built depth {depth} in {info['build_seconds']} s", file=sys.stderr)
    print(final)

# ------------------------------------------------------------------ reporting
def fnum(x, unit=""):
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if x >= 100:
        s = f"{x:.0f}"
    elif x >= 10:
        s = f"{x:.1f}"
    elif x >= 1:
        s = f"{x:.2f}"
    else:
        s = f"{x:.3f}"
    return s + unit

def ratio(a, b):
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0:
        r = a / b
        if r < 0.1:
            return f"{r:.2g}x"
        return f"{r:.2f}x" if r < 100 else f"{r:.0f}x"
    return "-"

def status_of(rc):
    rc = int(rc)
    if rc == 0:
        return "ok"
    if rc == -1:
        return "n/a"
    if rc in (124, 137):
        return "timeout"
    if rc == 127 or rc == 126:
        return "n/a"
    if rc > 128:
        sig = rc - 128
        names = {6: "SIGABRT", 9: "SIGKILL", 11: "SIGSEGV", 7: "SIGBUS"}
        return f"fail({names.get(sig, 'sig%d' % sig)})"
    return f"fail(rc={rc})"

def load(results):
    rows = []
    with open(results) as f:
        for line in f:
            p = line.rstrip("\n").split("\t")
            if len(p) < 8 or p[0] == "depth":
                continue
            depth, measure, tool, rep, rc, wall, rss, extra = p[:8]
            rows.append(dict(depth=int(depth), measure=measure, tool=tool, rep=int(rep),
                             rc=int(rc), wall=float(wall) if wall else None,
                             rss=int(rss) if rss.isdigit() else None, extra=extra))
    return rows

def summarize(rows):
    """(depth, measure, tool) -> dict(status, wall, rss, loop, n)"""
    groups = {}
    for r in rows:
        groups.setdefault((r["depth"], r["measure"], r["tool"]), []).append(r)
    out = {}
    for k, g in groups.items():
        bad = [r for r in g if r["rc"] != 0]
        if bad:
            st = "fail(EMFILE)" if bad[0]["extra"] == "emfile" else status_of(bad[0]["rc"])
            out[k] = dict(status=st, wall=st, rss=st, loop=st, n=len(g))
            continue
        walls = [r["wall"] for r in g]
        rsss = [r["rss"] for r in g if r["rss"] is not None]
        loops = []
        for r in g:
            for kv in r["extra"].split(","):
                if kv.startswith("loop="):
                    try:
                        loops.append(float(kv[5:]))
                    except ValueError:
                        pass
        out[k] = dict(status="ok", wall=statistics.median(walls),
                      rss=statistics.median(rsss) / 1024.0 if rsss else None,
                      loop=statistics.median(loops) if len(loops) == len(g) else None,
                      n=len(g))
    return out

def cmd_report(md_out, json_out, *results):
    # Several runs can be merged: for each (depth, tool), the last file that
    # has rows for it wins (so qemu-img and qcow2 may come from different runs).
    by_key = {}
    checks = {}
    M = None
    metas = []
    for res in results:
        base_name = res[:-4] if res.endswith(".tsv") else res
        rows_i = load(res)
        for key in {(r["depth"], r["tool"]) for r in rows_i if r["rc"] != -1 or r["tool"] != "qcow2"}:
            by_key[key] = [r for r in rows_i if (r["depth"], r["tool"]) == key]
            checks.pop(key, None)
        verify = base_name + ".verify.tsv"
        if os.path.exists(verify):
            with open(verify) as f:
                for line in f:
                    p = line.rstrip("\n").split("\t")
                    if len(p) >= 3 and (int(p[0]), p[1]) in by_key and by_key[(int(p[0]), p[1])][0] in rows_i:
                        checks[(int(p[0]), p[1])] = p[2]
        with open(base_name + ".meta.json") as f:
            Mi = json.load(f)
        metas.append(Mi)
        if M is None:
            M = dict(Mi)
        else:
            M.setdefault("chains", {}).update(Mi.get("chains", {}))
            for key in ("bench_args", "bench_count", "vsize_mib", "cluster_kib", "seed", "shadow"):
                if Mi.get(key) != M.get(key):
                    print(f"WARNING: merged runs differ in {key}: {M.get(key)!r} vs {Mi.get(key)!r}",
                          file=sys.stderr)
    rows = [r for k in sorted(by_key) for r in by_key[k]]
    S = summarize(rows)
    count = int(M["bench_count"])
    depths = sorted({d for d, _ in by_key})

    def v(d, m, t, field="wall"):
        e = S.get((d, m, t))
        return None if e is None else e[field]

    def rps(d, t, field="wall"):
        x = v(d, "bench", t, field)
        return count / x if isinstance(x, float) and x > 0 else x

    base = min(depths) if depths else None
    print(f"machine: {M.get('cpu')} x{M.get('nproc')}, {M.get('mem_gib')} GiB, {M.get('host')}; "
          f"load at start {', '.join(m.get('loadavg_at_start', '?') for m in metas)}")
    print(f"qemu: {M.get('qemu')}; qcow2: {M.get('qcow2')} git {M.get('git')}")
    print(f"bench arguments (both tools): {M.get('bench_args')}; timeout {M.get('timeout')} s")

    def loop_rps(d, t):
        x = v(d, "bench", t, "loop")
        if isinstance(x, float):
            return count / x if x > 0 else None
        return x
    lines = []
    P = lines.append
    for d in depths:
        ci = M.get("chains", {}).get(str(d), {})
        P("")
        P(f"== depth {d}: {ci.get('clusters', '?')} clusters, "
          f"{ci.get('shadowed_clusters', '?')} with a shadowed older version, "
          f"{ci.get('empty_layers', '?')} empty layers; fd soft limit {M['nofile']}"
          + ("  [qemu-img keeps one fd per layer open (+~10): expect EMFILE]" if d + 16 > int(M["nofile"]) else ""))
        hdr = f"{'measure':35} {'qcow2':>12} {'qemu-img':>12} {'ours/qemu':>10} " \
              f"{'ours dN/d' + str(base):>12} {'qemu dN/d' + str(base):>12}"
        P(hdr)
        P("-" * len(hdr))

        def row(label, m, field="wall", conv=None, unit=""):
            o, q = v(d, m, "qcow2", field), v(d, m, "qemu-img", field)
            ob, qb = v(base, m, "qcow2", field), v(base, m, "qemu-img", field)
            if conv:
                o, q, ob, qb = conv(d, "qcow2"), conv(d, "qemu-img"), conv(base, "qcow2"), conv(base, "qemu-img")
            P(f"{label:35} {fnum(o, unit):>12} {fnum(q, unit):>12} {ratio(o, q):>10} "
              f"{ratio(o, ob):>12} {ratio(q, qb):>12}")

        row("convert -O raw: wall (s)", "convert")
        row("convert -O raw: peak RSS (MiB)", "convert", "rss")
        P(f"{'convert output == equivalent.raw':35} {checks.get((d, 'qcow2'), '-'):>12} "
          f"{checks.get((d, 'qemu-img'), '-'):>12}")
        row(f"bench: wall (s)", "bench")
        row(f"bench: reads/s (whole command)", "bench", conv=lambda dd, t: rps(dd, t))
        row(f"bench: reads/s (tool's own loop)", "bench", conv=loop_rps)
        row("bench -c 1 (open chain+1 read) (s)", "open1")
        row("info TOP: wall (s)", "info")
        row("info --backing-chain TOP: wall (s)", "infochain")
        cat = v(d, "cat-null", "cat")
        cp = v(d, "cat-copy", "cat")
        o = v(d, "convert", "qcow2")
        q = v(d, "convert", "qemu-img")
        P(f"baseline cat equivalent.raw >/dev/null: {fnum(cat, ' s')}   ours/cat {ratio(o, cat)}   qemu/cat {ratio(q, cat)}")
        P(f"baseline cat equivalent.raw >out.raw:   {fnum(cp, ' s')}   ours/copy {ratio(o, cp)}   qemu/copy {ratio(q, cp)}")
        for t in ("qcow2", "qemu-img"):
            if checks.get((d, t)) == "MISMATCH":
                P(f"WARNING: {t} convert output differs from equivalent.raw at depth {d}: its numbers are not trustworthy")
    text = "\n".join(lines)
    print(text)

    # Markdown summary (pasted into docs/BENCHMARKS.md).
    md = []
    def reps_of(d):
        n = {t: max((e["n"] for (dd, m, tt), e in S.items() if dd == d and tt == t), default=0)
             for t in ("qcow2", "qemu-img")}
        return str(n["qcow2"]) if n["qcow2"] == n["qemu-img"] else f"{n['qcow2']}/{n['qemu-img']}"
    md.append("Convert (`convert -O raw TOP out.raw`; wall seconds, medians; peak RSS in MiB):")
    md.append("")
    md.append(f"| depth | reps (ours/qemu) | qcow2 s | qemu-img s | ours/qemu | cat s | ours/cat | qemu/cat | ours dN/d{base} | qemu dN/d{base} | qcow2 RSS | qemu-img RSS | output check (ours/qemu) |")
    md.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---|")
    for d in depths:
        o, q, cat = v(d, "convert", "qcow2"), v(d, "convert", "qemu-img"), v(d, "cat-null", "cat")
        ob, qb = v(base, "convert", "qcow2"), v(base, "convert", "qemu-img")
        md.append(f"| {d} | {reps_of(d)} | {fnum(o)} | {fnum(q)} | {ratio(o, q)} | {fnum(cat)} | {ratio(o, cat)} | {ratio(q, cat)} | "
                  f"{ratio(o, ob)} | {ratio(q, qb)} | {fnum(v(d, 'convert', 'qcow2', 'rss'))} | "
                  f"{fnum(v(d, 'convert', 'qemu-img', 'rss'))} | {checks.get((d, 'qcow2'), '-')} / {checks.get((d, 'qemu-img'), '-')} |")
    md.append("")
    md.append(f"Reads (`bench {M['bench_args']}`, whole-command wall seconds and reads/s; "
              f"open = `bench -c 1`; info = `info TOP`):")
    md.append("")
    md.append(f"| depth | reps (ours/qemu) | qcow2 bench s | qemu-img bench s | ours/qemu | qcow2 reads/s | qemu-img reads/s | qcow2 loop reads/s | qemu-img loop reads/s | ours dN/d{base} | qemu dN/d{base} | qcow2 open s | qemu-img open s | qcow2 info s | qemu-img info s | qcow2 info --backing-chain s | qemu-img info --backing-chain s |")
    md.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for d in depths:
        o, q = v(d, "bench", "qcow2"), v(d, "bench", "qemu-img")
        ob, qb = v(base, "bench", "qcow2"), v(base, "bench", "qemu-img")
        md.append(f"| {d} | {reps_of(d)} | {fnum(o)} | {fnum(q)} | {ratio(o, q)} | {fnum(rps(d, 'qcow2'))} | {fnum(rps(d, 'qemu-img'))} | "
                  f"{fnum(loop_rps(d, 'qcow2'))} | {fnum(loop_rps(d, 'qemu-img'))} | "
                  f"{ratio(o, ob)} | {ratio(q, qb)} | {fnum(v(d, 'open1', 'qcow2'))} | {fnum(v(d, 'open1', 'qemu-img'))} | "
                  f"{fnum(v(d, 'info', 'qcow2'))} | {fnum(v(d, 'info', 'qemu-img'))} | "
                  f"{fnum(v(d, 'infochain', 'qcow2'))} | {fnum(v(d, 'infochain', 'qemu-img'))} |")
    with open(md_out, "w") as f:
        f.write("\n".join(md) + "\n")
    print("")
    print("\n".join(md))
    summary = {f"{d}/{m}/{t}": e for (d, m, t), e in sorted(S.items())}
    with open(json_out, "w") as f:
        json.dump({"meta": M, "runs": metas, "summary": summary, "checks": {f"{d}/{t}": c for (d, t), c in checks.items()},
                   "raw": rows}, f, indent=1)

def cmd_sub(a, b):
    print(f"{float(b) - float(a):.6f}")

def cmd_loop(path):
    # "Run completed in 1.234 seconds." (qemu-img bench); accept the same from ours.
    import re
    try:
        txt = open(path, errors="replace").read()
    except OSError:
        return
    m = re.search(r"completed in ([0-9.]+) ?s", txt)
    if m:
        print(m.group(1))

def cmd_meta_add_chain(meta, depth, chain_dir):
    with open(meta) as f:
        M = json.load(f)
    with open(os.path.join(chain_dir, ".complete")) as f:
        M.setdefault("chains", {})[str(depth)] = json.load(f)
    with open(meta, "w") as f:
        json.dump(M, f, indent=1)

if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"build": cmd_build, "report": cmd_report, "sub": cmd_sub, "loop": cmd_loop,
     "meta-add-chain": cmd_meta_add_chain}[cmd](*args)
PYEOF

if [ "$REPORT_ONLY" = 1 ]; then
  RES_DIR="$WORK_DIR/results"; mkdir -p "$RES_DIR"
  STAMP=$(date +%Y%m%d-%H%M%S)
  "$PY" "$HELPER" report "$RES_DIR/merged-$STAMP.md" "$RES_DIR/merged-$STAMP.json" "$@"
  rc=$?
  echo; echo "bench-chain: merged summary $RES_DIR/merged-$STAMP.{md,json}"
  exit $rc
fi

# ---------------------------------------------------------------- environment
# qemu-img keeps every layer of a chain open (>= 1 fd per layer): raise the soft
# fd limit to the hard limit and report it.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)

# Our binary.
OURS_NOTE=""
if [ -z "${QCOW2:-}" ]; then
  QCOW2=.build/release/qcow2
  if [ "${SKIP_BUILD:-0}" != 1 ] && [ "$SKIP_OURS" != 1 ] && [ "$BUILD_ONLY" != 1 ]; then
    echo "bench-chain: swift build -c release --product qcow2" >&2
    if ! swift build -c release --product qcow2 >&2; then
      OURS_NOTE="swift build failed"
      echo "bench-chain: WARNING: swift build failed; qcow2 columns will be n/a" >&2
    fi
  fi
fi
case "$QCOW2" in /*) ;; *) QCOW2="$REPO_ROOT/$QCOW2" ;; esac
OURS_OK=1
if [ "$SKIP_OURS" = 1 ]; then
  OURS_OK=0; OURS_NOTE="skipped (SKIP_OURS=1)"
elif [ ! -x "$QCOW2" ]; then
  OURS_OK=0; OURS_NOTE="${OURS_NOTE:+$OURS_NOTE; }$QCOW2 not found"
  echo "bench-chain: WARNING: $QCOW2 is not an executable; qcow2 columns will be n/a" >&2
fi

# Output directory for convert targets: tmpfs when possible, so the measurement
# is the read path and not the disk (qemu-img convert fdatasyncs its output).
if [ -z "${OUT_DIR:-}" ]; then
  need_kib=$(( 3 * VSIZE_MIB * 1024 ))
  shm_kib=$(df -Pk /dev/shm 2>/dev/null | awk 'NR==2 {print $4}')
  if [ -n "$shm_kib" ] && [ "$shm_kib" -gt "$need_kib" ] 2>/dev/null; then
    OUT_DIR=$(mktemp -d /dev/shm/qcow2-bench.XXXXXX)
    OUT_DIR_CREATED=$OUT_DIR
  else
    OUT_DIR="$WORK_DIR/out"
  fi
fi
mkdir -p "$OUT_DIR"

STAMP=$(date +%Y%m%d-%H%M%S)
RES_DIR="$WORK_DIR/results"
LOG_DIR="$RES_DIR/logs-$STAMP"
mkdir -p "$RES_DIR" "$LOG_DIR"
RESULTS="$RES_DIR/run-$STAMP.tsv"
VERIFY="$RES_DIR/run-$STAMP.verify.tsv"
META="$RES_DIR/run-$STAMP.meta.json"
printf 'depth\tmeasure\ttool\trep\trc\twall\trss_kib\textra\n' >"$RESULTS"
: >"$VERIFY"

BENCH_ARGS="-c $BENCH_COUNT -s $BENCH_SIZE -S $BENCH_STEP -d $BENCH_QD"
QEMU_VERSION=$(qemu-img --version | head -1)
OURS_VERSION="n/a"
if [ "$OURS_OK" = 1 ]; then
  OURS_VERSION="$QCOW2 (built $(date -r "$QCOW2" '+%Y-%m-%d %H:%M:%S'))"
fi
GIT_REV=$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git -C "$REPO_ROOT" status --porcelain -- Sources Package.swift 2>/dev/null)" ]; then
  GIT_REV="$GIT_REV+uncommitted-Sources"
fi
CPU=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo 2>/dev/null)
MEM_GIB=$(awk '/MemTotal/ {printf "%.0f", $2/1048576}' /proc/meminfo 2>/dev/null)
"$PY" - "$META" <<PYEOF
import json, sys
json.dump({
  "date": "$(date -Is)", "host": "$(uname -srm)", "cpu": "$CPU", "nproc": $NPROC,
  "mem_gib": "$MEM_GIB", "loadavg_at_start": "$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)", "git": "$GIT_REV", "qemu": "$QEMU_VERSION",
  "qcow2": "$OURS_VERSION", "qcow2_note": "$OURS_NOTE", "reps": $REPS, "timeout": $TIMEOUT,
  "nofile": $NOFILE, "depths": "$DEPTHS", "vsize_mib": $VSIZE_MIB,
  "cluster_kib": $CLUSTER_KIB, "seed": "$SEED", "shadow": "$SHADOW",
  "bench_count": $BENCH_COUNT, "bench_args": "$BENCH_ARGS", "out_dir": "$OUT_DIR",
  "chains": {}}, open(sys.argv[1], "w"), indent=1)
PYEOF

echo "bench-chain: depths [$DEPTHS], reps $REPS, timeout ${TIMEOUT}s, fd limit $NOFILE"
echo "bench-chain: qemu: $QEMU_VERSION; qcow2: $OURS_VERSION ${OURS_NOTE:+($OURS_NOTE)}"
echo "bench-chain: git $GIT_REV; work dir $WORK_DIR, convert outputs in $OUT_DIR"
echo "bench-chain: bench arguments (both tools): $BENCH_ARGS"

# ---------------------------------------------------------------- measurement
# run_timed DEPTH MEASURE TOOL REP OUTFILE -- CMD...
# Appends one TSV row: rc, wall seconds (date +%s.%N around the command),
# peak RSS in KiB (/usr/bin/time %M, which includes waited-for children).
run_timed() {
  local depth=$1 measure=$2 tool=$3 rep=$4 out=$5; shift 6
  local log="$LOG_DIR/d$depth-$measure-$tool-$rep.log" tf="$LOG_DIR/.time"
  local t0 t1 rc wall rss extra=""
  if [ "$out" != "-" ]; then rm -f "$out"; fi
  t0=$(date +%s.%N)
  /usr/bin/time -o "$tf" -f '%M' timeout -k 10 "$TIMEOUT" "$@" >"$log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  wall=$("$PY" "$HELPER" sub "$t0" "$t1")
  rss=$(tail -n 1 "$tf" 2>/dev/null | tr -dc '0-9')
  if [ "$measure" = bench ] && [ "$rc" -eq 0 ]; then
    local loop; loop=$("$PY" "$HELPER" loop "$log")
    [ -n "$loop" ] && extra="loop=$loop"
  fi
  if [ "$rc" -ne 0 ] && grep -q 'Too many open files' "$log"; then extra="emfile"; fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$depth" "$measure" "$tool" "$rep" "$rc" "$wall" "$rss" "$extra" >>"$RESULTS"
  if [ "$rc" -ne 0 ]; then
    echo "    $measure/$tool rep $rep: exit $rc after ${wall}s: ...$(grep -v '^$' "$log" | tail -n 1 | rev | cut -c1-150 | rev)" >&2
  else
    rm -f "$log"
  fi
  return "$rc"
}

record_na() {  # depth measure tool rep
  printf '%s\t%s\t%s\t%s\t-1\t\t\tn/a\n' "$1" "$2" "$3" "$4" >>"$RESULTS"
}

declare -A SKIP=()
# measure DEPTH MEASURE TOOL REP OUTFILE -- CMD...: runs unless this
# (depth, measure, tool) already failed or timed out (then it is not retried).
measure() {
  local key="$1/$2/$3"
  if [ -n "${SKIP[$key]:-}" ]; then return 0; fi
  if ! run_timed "$@"; then SKIP[$key]=1; return 1; fi
  return 0
}

for depth in $DEPTHS; do
  echo
  echo "== depth $depth: chain"
  chain=$("$PY" "$HELPER" build "$WORK_DIR" "$depth" "$VSIZE_MIB" "$CLUSTER_KIB" "$SEED" "$SHADOW" "$BUILD_JOBS")
  if [ $? -ne 0 ] || [ ! -f "$chain/.complete" ]; then
    echo "bench-chain: building the depth-$depth chain failed" >&2
    exit 1
  fi
  "$PY" "$HELPER" meta-add-chain "$META" "$depth" "$chain"
  top="$chain/$(cat "$chain/TOP")"
  raw="$chain/equivalent.raw"
  echo "   $chain ($(du -sh "$chain" | cut -f1)); top $top"
  [ "$BUILD_ONLY" = 1 ] && continue
  if [ $(( depth + 16 )) -gt "$NOFILE" ]; then
    echo "   NOTE: depth $depth + margin exceeds the fd limit $NOFILE; qemu-img will likely fail to open the chain"
  fi

  # Warm the page cache: every layer and the raw file are read once before any
  # timing, so all reps (for every tool) run from memory.
  cat "$chain"/*.qcow2 "$raw" >/dev/null

  out="$OUT_DIR/out.raw"
  for rep in $(seq 1 "$REPS"); do
    echo "   rep $rep/$REPS"
    # convert
    if [ "$SKIP_QEMU" != 1 ]; then
      if measure "$depth" convert qemu-img "$rep" "$out" -- qemu-img convert -O raw "$top" "$out" && [ "$rep" = 1 ]; then
        if cmp -s "$out" "$raw"; then c=ok; else c=MISMATCH; fi
        printf '%s\tqemu-img\t%s\n' "$depth" "$c" >>"$VERIFY"
      elif [ "$rep" = 1 ]; then printf '%s\tqemu-img\tn/a\n' "$depth" >>"$VERIFY"; fi
    fi
    if [ "$OURS_OK" = 1 ]; then
      if measure "$depth" convert qcow2 "$rep" "$out" -- "$QCOW2" convert -O raw "$top" "$out" && [ "$rep" = 1 ]; then
        if cmp -s "$out" "$raw"; then c=ok; else c=MISMATCH; fi
        printf '%s\tqcow2\t%s\n' "$depth" "$c" >>"$VERIFY"
      elif [ "$rep" = 1 ]; then printf '%s\tqcow2\tn/a\n' "$depth" >>"$VERIFY"; fi
    else
      record_na "$depth" convert qcow2 "$rep"
    fi
    rm -f "$out"
    # baselines (run_timed sends stdout to a log, so redirect inside sh -c)
    measure "$depth" cat-null cat "$rep" - -- sh -c 'exec cat "$1" >/dev/null' sh "$raw"
    measure "$depth" cat-copy cat "$rep" "$out" -- sh -c 'exec cat "$1" >"$2"' sh "$raw" "$out"
    rm -f "$out"

    # bench (scattered 4 KiB reads; identical arguments), then open (+1 read)
    if [ "$SKIP_QEMU" != 1 ]; then
      measure "$depth" bench qemu-img "$rep" - -- qemu-img bench $BENCH_ARGS "$top"
      measure "$depth" open1 qemu-img "$rep" - -- qemu-img bench -c 1 -s "$BENCH_SIZE" -d 1 "$top"
      measure "$depth" info qemu-img "$rep" - -- qemu-img info "$top"
      measure "$depth" infochain qemu-img "$rep" - -- qemu-img info --backing-chain "$top"
    fi
    if [ "$OURS_OK" = 1 ]; then
      # shellcheck disable=SC2086
      measure "$depth" bench qcow2 "$rep" - -- "$QCOW2" bench $BENCH_ARGS $OURS_BENCH_EXTRA "$top"
      measure "$depth" open1 qcow2 "$rep" - -- "$QCOW2" bench -c 1 -s "$BENCH_SIZE" -d 1 "$top"
      measure "$depth" info qcow2 "$rep" - -- "$QCOW2" info "$top"
      measure "$depth" infochain qcow2 "$rep" - -- "$QCOW2" info --backing-chain "$top"
    else
      for m in bench open1 info infochain; do record_na "$depth" "$m" qcow2 "$rep"; done
    fi
  done
done

[ "$BUILD_ONLY" = 1 ] && { echo; echo "bench-chain: chains built (BUILD_ONLY=1)"; exit 0; }

echo
echo "bench-chain: medians over $REPS reps (ratios: ours/qemu = qcow2 time / qemu-img time; dN/d1 = time at this depth / time at the smallest depth run)"
"$PY" "$HELPER" report "$RES_DIR/run-$STAMP.md" "$RES_DIR/run-$STAMP.json" "$RESULTS"
rm -f "$LOG_DIR/.time"; rmdir "$LOG_DIR" 2>/dev/null || true
echo
echo "bench-chain: raw rows $RESULTS; summary $RES_DIR/run-$STAMP.{md,json}"
