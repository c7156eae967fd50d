#!/usr/bin/env bash
# Interleaved A/B runs of two builds of relay-server and relay-bench: each round starts a fresh
# server of build A, runs one workload, stops it, then the same with build B. Prints msgs/s,
# the server's CPU (user + system, from /proc) and the load generator's CPU per message. Not a
# test: nothing here passes or fails on speed.
#
#   bash bench/ab.sh ROUNDS DIR_A DIR_B      # each DIR holds relay-server and relay-bench
#
# Environment: W (workload, default "pairs --pairs 16"), M (messages, default 3000000), EXTRA
# (more relay-bench options, default "--keys"; " " for guests), SARGS_A / SARGS_B (server
# options, e.g. "--kernel-unsent 0"), PORT (default 18091).
set -euo pipefail
ROUNDS=${1:?rounds}; A=${2:?build A}; B=${3:?build B}
M=${M:-3000000}; EXTRA=${EXTRA:---keys}; W=${W:-pairs --pairs 16}; PORT=${PORT:-18091}
tck=$(getconf CLK_TCK)
one() {
    local bin=$1 sargs=$2 dir out rate cpu s0 s1 pid
    dir=$(mktemp -d)
    # shellcheck disable=SC2086
    "$bin/relay-server" --host 127.0.0.1 --port "$PORT" --data-dir "$dir" $sargs </dev/null \
        >/dev/null 2>&1 &
    pid=$!
    sleep 0.4
    s0=$(awk '{print $14+$15}' "/proc/$pid/stat")
    # shellcheck disable=SC2086
    out=$( { /usr/bin/time -f "CPU %U %S" "$bin/relay-bench" --target "127.0.0.1:$PORT" $W \
        --messages "$M" $EXTRA; } 2>&1 )
    s1=$(awk '{print $14+$15}' "/proc/$pid/stat")
    kill "$pid"; wait "$pid" 2>/dev/null || true; rm -rf "$dir"
    rate=$(echo "$out" | grep "msgs/s" | awk '{print $2}')
    cpu=$(echo "$out" | grep "^CPU" | awk '{print $2+$3}')
    awk -v r="$rate" -v s=$((s1 - s0)) -v c="$cpu" -v t="$tck" -v m="$M" \
        'BEGIN{printf "%s M/s  server %.0f ns  client %.0f ns", r, s/t*1e9/m, c*1e9/m}'
}
for r in $(seq "$ROUNDS"); do
    echo "round $r  A: $(one "$A" "${SARGS_A:-}")   B: $(one "$B" "${SARGS_B:-}")"
done
