#!/usr/bin/env bash
# User-space instructions per short stream of each sockmuxd daemon, counted by callgrind.
#
# Wall-clock figures on a shared 2-core machine move by 10-20 % from one run to the next;
# instruction counts repeat to within 1 % (same binary, same input), so this is the A/B
# figure for changes to the per-stream code path (bench/tunnel.py stays the benchmark
# against ssh -L). Kernel time is not counted: compare system calls with strace -c.
#
# usage: bench/stream_instructions.sh [--round-trips] [TREE] [N]
#   TREE     source tree to run sockmuxd from (default: this repository)
#   N        measured streams, over 2 clients (default 200); with --round-trips, measured
#            1-byte round trips over one stream (default 2000)
# Each stream is what bench/tunnel.py's new-stream clients do: connect to the entrance, send
# 1 byte, read it back, close. Each round trip is what its round-trip client does: send 1
# byte on an open stream, read it back (the data path alone; the stream that carries them and
# the two that wake the daemons for callgrind's commands add about 0.5 %). Both daemons run under valgrind (about 50x slower), so the
# entrance waits 50 ms for first bytes instead of 1 ms (the wait is a timing choice, and
# under valgrind 1 ms would open streams before their bytes arrive: another code path).
# Needs valgrind (Debian: apt-get install valgrind). Takes about 40 s.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
unit=stream
if [ "${1:-}" = --round-trips ]; then unit="round trip"; shift; fi
tree=$(cd "${1:-$here}" && pwd)
if [ "$unit" = stream ]; then count=${2:-200}; else count=${2:-2000}; fi
py="$here/.venv/bin/python"
[ -x "$py" ] || py=python3
command -v valgrind >/dev/null || { echo "needs valgrind: apt-get install valgrind" >&2; exit 2; }

work=$(mktemp -d /tmp/stream-instructions.XXXXXX)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
cd "$work"
(umask 077; head -c 32 /dev/urandom | base64 > secret)
port() { "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
client() { echo go | "$py" "$here/bench/tunnel.py" --_role rate "{\"port\": $entrance, \"count\": $1}"; }

"$py" "$here/bench/tunnel.py" --_role echo 1 > echo.json & pids+=($!)
for _ in $(seq 50); do [ -s echo.json ] && break; sleep 0.1; done
echo_port=$("$py" -c 'import json, sys; print(json.load(open("echo.json"))["ports"][0])')
link=$(port); entrance=$(port)
vg=(valgrind --tool=callgrind --dump-instr=no --callgrind-out-file="$work/cg.%p.out")
# --stream-log-rate 0: no stream gets a log record of its own, as nearly none does under
# bench/tunnel.py's load (100 records/s of ~5,000 streams/s); under valgrind's ~50 streams/s
# the default rate would give every stream one (~14k instructions each, the record's text).
common=(--secret secret --dead-peer 600 --first-data-wait 50ms --stream-log-rate 0)
PYTHONPATH="$tree" "${vg[@]}" "$py" -m tcpmuxd.sockmux.daemon --accept "127.0.0.1:$link" \
    --exit "$entrance=127.0.0.1:$echo_port" "${common[@]}" 2> exit.log & exit_pid=$!; pids+=($!)
sleep 4
PYTHONPATH="$tree" "${vg[@]}" "$py" -m tcpmuxd.sockmux.daemon --connect "127.0.0.1:$link" \
    --entrance "127.0.0.1:$entrance" "${common[@]}" 2> entrance.log & entrance_pid=$!; pids+=($!)
for _ in $(seq 120); do grep -q "link .* up" entrance.log 2>/dev/null && break; sleep 0.5; done
grep -q "link .* up" entrance.log || { echo "the link did not come up:" >&2; tail entrance.log >&2; exit 1; }
client 50 > /dev/null  # warm-up

# callgrind takes a command when the process runs: ask, then wake the daemons with one stream
control() {
    callgrind_control "$1" "$exit_pid" > /dev/null & local a=$!
    callgrind_control "$1" "$entrance_pid" > /dev/null & local b=$!
    sleep 0.5; client 1 > /dev/null; wait "$a" "$b"
}
control -z
if [ "$unit" = stream ]; then
    client $((count / 2)) > c1.json & c1=$!
    client $((count - count / 2)) > c2.json & c2=$!
    wait "$c1" "$c2"
else
    "$py" "$here/bench/tunnel.py" --_role rtt "{\"port\": $entrance, \"warmup\": 0, \"n\": $count}" > rtt.json
fi
sleep 0.5
control -d
"$py" - "$unit" c1.json c2.json rtt.json <<'EOF'
import json, os, sys
ok = errors = 0
for name in sys.argv[2:]:
    if not os.path.exists(name):
        continue
    text = open(name).read()
    data = json.loads(text.split("\n", 1)[1] if name.startswith("c") else text)
    ok += len(data["lat"])
    errors += sum(data["errors"].values()) if name.startswith("c") else data["error"] is not None
print(f"{sys.argv[1]}s: {ok} measured, {errors} failed")
EOF
for side in exit entrance; do
    pid=$([ $side = exit ] && echo "$exit_pid" || echo "$entrance_pid")
    dump=$(ls -t "$work"/cg."$pid".out.* | head -1)
    total=$(grep -m1 '^summary:' "$dump" | awk '{print $2}')
    printf '%-9s %8d instructions per %s\n' "$side" $((total / count)) "$unit"
done
build=$(PYTHONPATH="$tree" "$py" -c 'import tcpmuxd.sockmux.daemon
try:
    from tcpmuxd.sockmux import native; print(native.describe())
except ImportError:
    print("pure Python")')
echo "tree: $tree ($build)"
