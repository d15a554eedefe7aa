#!/usr/bin/env bash
# Time real guests through hatchery's queue path, beside the same steps done by hand.
#
# Usage: bench.sh [RUNS]        (3 runs by default; prints every run, then the medians)
#
# Each run does two things on the real-VM environment (env.sh), one after the other:
#   hatchery  a job published to RabbitMQ from the root namespace, taken by `hatchery worker`
#             inside the namespace (serial console logged to CONSOLE_DIR), followed with
#             `hatchery events --json`: publish to job.started, each stage's duration from the
#             job.succeeded event, publish to job.succeeded; then deprovisioned through the queue
#   plain     virsh and ssh doing the same steps on the same image: overlay, define and start,
#             wait for the lease, wait for an SSH login, upload, run and remove the script
# For both, the guest's own uptime when sshd listened, from its `HATCHERY-SSHD-UP` console line.
#
# Settings (environment): HATCHERY_BIN (default: target/release/hatchery, built first);
# HATCHERY_E2E_NS and HATCHERY_E2E_STATE as for env.sh, by default a namespace of the bench's
# own (hatchery-e2e-bench), so that a test run's environment is left alone. The environment is
# brought up first and taken down at the end.
#
# Not a test: nothing here passes or fails on a figure. TCG guests on a shared machine vary by
# seconds; read medians.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly HERE ROOT=$HERE/../..
readonly RUNS=${1:-3}
export HATCHERY_E2E_NS=${HATCHERY_E2E_NS:-hatchery-e2e-bench}
export HATCHERY_E2E_STATE=${HATCHERY_E2E_STATE:-/tmp/hatchery-e2e-bench}
readonly SCRIPT=$'#!/bin/sh\nuname -r\n'
declare -A E # the env file

log() { printf '[bench %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
now() { date +%s.%N; }
# seconds from $1 to $2, two decimals
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
virsh_() { virsh -q -c "${E[LIBVIRT_URI]}" "$@"; }
in_ns() { ip netns exec "${E[NETNS]}" "$@"; }

load_env() {
  local key value
  while IFS='=' read -r key value; do E[$key]=$value; done <"$1"
}

# The guest's uptime when sshd listened, from console log $1 (waits for the line briefly).
sshd_uptime() {
  local _ line
  for _ in $(seq 50); do
    line=$(grep -a -m1 "${E[SSHD_MARKER]}" "$1" 2>/dev/null) && break
    sleep 0.1
  done
  [[ -n ${line:-} ]] || { echo "n/a" && return; }
  awk '{ print $2 }' <<<"$line" | tr -d '\r'
}

# --- hatchery ------------------------------------------------------------------------------

start_fleet() {
  PREFIX=bench$$
  cat >"$TMP/worker.toml" <<EOF
[hypervisors.e2e]
uri = "${E[LIBVIRT_URI]}"

[worker]
serial_log_dir = "${E[CONSOLE_DIR]}"

[secrets]
key_dir = "$(dirname "${E[SSH_KEY]}")"
EOF
  in_ns "$BIN" worker --amqp-url "${E[AMQP_URL]}" --prefix "$PREFIX" --name bench \
    --config "$TMP/worker.toml" >/dev/null 2>"$TMP/worker.log" &
  WORKER=$!
  "$BIN" events --json --prefix "$PREFIX" >"$TMP/events.jsonl" 2>"$TMP/events.log" &
  FOLLOWER=$!
  local _
  for _ in $(seq 300); do
    grep -q "taking jobs" "$TMP/worker.log" && break
    sleep 0.1
  done
  grep -q "taking jobs" "$TMP/worker.log" || die "worker did not start: $(cat "$TMP/worker.log")"
  sleep 1 # the follower binds its queue meanwhile; it prints nothing until events come
}

# job_json NAME ID: a provisioning job for the test image, logging in with the named test key
job_json() {
  jq -n --arg id "$2" --arg name "$1" --arg type "${E[DOMAIN_TYPE]}" --arg pool "${E[POOL]}" \
    --arg vol "${E[BASE_VOLUME]}" --arg sha "${E[BASE_SHA256]}" --arg net "${E[NETWORK]}" \
    --arg kernel "${E[KERNEL]}" --arg initrd "${E[INITRD]}" \
    --arg cmdline "${E[CMDLINE]} hatchery.hostname=$1" --arg key "$(basename "${E[SSH_KEY]}")" \
    --arg user "${E[SSH_USER]}" --arg script "$SCRIPT" '{
      id: $id, hypervisor: "e2e",
      provision: {
        vm: { name: $name, vcpus: 1, memory_mib: 256, domain_type: $type,
              base: { pool: $pool, volume: $vol, sha256: $sha }, disk_gib: 1,
              nics: [{ network: $net }], console: { type: "vnc", listen: "127.0.0.1" },
              boot: { kernel: $kernel, initrd: $initrd, cmdline: $cmdline } },
        address: { source: "lease" },
        finish: { user: $user, key_name: $key, script: $script, timeout_secs: 60 },
        timeouts: { address_secs: 120, finish_secs: 120 } } }'
}

# The final event of job $1 as one line of JSON, once the follower has it.
final_event() {
  local deadline=$((SECONDS + 300)) line
  while ((SECONDS < deadline)); do
    line=$(jq -c --arg id "$1" 'select(.subject == $id and
      (.type | test("job\\.(succeeded|failed|cancelled|rejected)$")))' "$TMP/events.jsonl" |
      head -1)
    [[ -n $line ]] && { echo "$line" && return; }
    sleep 0.1
  done
  die "no final event for job $1 within 300 s; worker log: $TMP/worker.log"
}

# seconds since the epoch of an RFC 3339 time
epoch() { date -d "$1" +%s.%N; }

hatchery_run() {
  local name=bench-h$1 id t0 last started stage
  id=$(cat /proc/sys/kernel/random/uuid)
  job_json "$name" "$id" >"$TMP/$name.json"
  t0=$(now)
  "$BIN" submit --prefix "$PREFIX" "$TMP/$name.json" >/dev/null 2>&1
  last=$(final_event "$id")
  [[ $(jq -r .type <<<"$last") == *job.succeeded ]] || die "job $name: $last"
  started=$(jq -r --arg id "$id" 'select(.subject == $id and (.type | endswith("job.started")))
    | .time' "$TMP/events.jsonl" | head -1)
  H_QUEUE+=("$(secs "$t0" "$(epoch "$started")")")
  H_TOTAL+=("$(secs "$t0" "$(epoch "$(jq -r .time <<<"$last")")")")
  for stage in overlay domain address finish; do
    local -n column=H_${stage^^}
    column+=("$(printf '%.2f' "$(jq -r --arg s "$stage" \
      '.data.stages[] | select(.stage == $s) | .duration_ms / 1000' <<<"$last")")")
  done
  [[ -f ${E[CONSOLE_DIR]}/$name-serial.log ]] ||
    log "no serial console log at ${E[CONSOLE_DIR]}/$name-serial.log"
  H_SSHD+=("$(sshd_uptime "${E[CONSOLE_DIR]}/$name-serial.log")")

  id=$(cat /proc/sys/kernel/random/uuid)
  jq -n --arg id "$id" --arg name "$name" \
    '{ id: $id, hypervisor: "e2e", deprovision: { name: $name } }' >"$TMP/$name-gone.json"
  "$BIN" submit --prefix "$PREFIX" "$TMP/$name-gone.json" >/dev/null 2>&1
  final_event "$id" >/dev/null
}

# --- plain virsh and ssh -------------------------------------------------------------------

plain_xml() {
  cat <<EOF
<domain type='${E[DOMAIN_TYPE]}'>
  <name>$1</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64'>hvm</type>
    <kernel>${E[KERNEL]}</kernel>
    <initrd>${E[INITRD]}</initrd>
    <cmdline>${E[CMDLINE]} hatchery.hostname=$1</cmdline>
  </os>
  <features><acpi/></features>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='${E[POOL_PATH]}/$1.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='network'>
      <source network='${E[NETWORK]}'/>
      <mac address='$2'/>
      <model type='virtio'/>
    </interface>
    <serial type='pty'><log file='${E[CONSOLE_DIR]}/$1-serial.log' append='off'/></serial>
    <console type='pty'/>
    <graphics type='vnc' listen='127.0.0.1'/>
  </devices>
</domain>
EOF
}

guest_ssh() {
  in_ns ssh -F /dev/null -i "${E[SSH_KEY]}" -o BatchMode=yes -o ConnectTimeout=3 \
    -o StrictHostKeyChecking=yes -o UserKnownHostsFile="${E[SSH_KNOWN_HOSTS]}" \
    -o LogLevel=ERROR "${E[SSH_USER]}@$IP" "$@"
}

plain_run() {
  local name=bench-p$1 mac t0 t1 t2 t3 t4 t5 deadline
  mac=$(printf '52:54:00:77:02:%02x' "$1")
  t0=$(now)
  virsh_ vol-create-as "${E[POOL]}" "$name.qcow2" 1G --format qcow2 \
    --backing-vol "${E[BASE_VOLUME]}" --backing-vol-format qcow2 >/dev/null
  t1=$(now)
  plain_xml "$name" "$mac" >"$TMP/$name.xml"
  virsh_ define "$TMP/$name.xml" >/dev/null
  virsh_ start "$name" >/dev/null
  t2=$(now)
  IP='' deadline=$((SECONDS + 120))
  until [[ -n $IP ]]; do
    ((SECONDS < deadline)) || die "$name: no lease within 120 s"
    sleep 0.2
    IP=$(virsh_ net-dhcp-leases "${E[NETWORK]}" --mac "$mac" | awk '{ sub(/\/.*/, "", $5); print $5 }')
  done
  t3=$(now)
  until guest_ssh true 2>/dev/null; do
    ((SECONDS < deadline)) || die "$name: no SSH login within 120 s"
    sleep 0.1
  done
  t4=$(now)
  guest_ssh 'cat >/var/tmp/bench.sh' <<<"$SCRIPT"
  guest_ssh 'sh /var/tmp/bench.sh >/var/tmp/bench.out 2>&1; cat /var/tmp/bench.out;
    rm -f /var/tmp/bench.sh /var/tmp/bench.out' >/dev/null
  t5=$(now)
  P_OVERLAY+=("$(secs "$t0" "$t1")") P_DOMAIN+=("$(secs "$t1" "$t2")")
  P_ADDRESS+=("$(secs "$t2" "$t3")") P_FINISH+=("$(secs "$t3" "$t5")")
  P_LOGIN+=("$(secs "$t3" "$t4")") P_TOTAL+=("$(secs "$t0" "$t5")")
  P_SSHD+=("$(sshd_uptime "${E[CONSOLE_DIR]}/$name-serial.log")")
  remove_plain "$name"
}

remove_plain() {
  virsh_ destroy "$1" >/dev/null 2>&1 || true
  virsh_ undefine "$1" >/dev/null 2>&1 || true
  virsh_ vol-delete --pool "${E[POOL]}" "$1.qcow2" >/dev/null 2>&1 || true
}

# --- report --------------------------------------------------------------------------------

median() {
  printf '%s\n' "$@" | grep -v n/a | sort -g |
    awk '{ v[NR] = $1 } END { if (NR == 0) print "n/a"; else if (NR % 2) print v[(NR + 1) / 2];
      else printf "%.2f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# row LABEL ARRAY-NAME: the runs' figures, then their median
row() {
  local -n values=$2
  printf '%-34s' "$1"
  printf '%8s' "${values[@]}"
  printf '%10s\n' "$(median "${values[@]}")"
}

report() {
  local i
  printf '\n%-34s' "seconds"
  for ((i = 1; i <= RUNS; i++)); do printf '%8s' "run $i"; done
  printf '%10s\n' median
  echo "hatchery (queue, worker in the namespace)"
  row "  publish -> job.started" H_QUEUE
  row "  overlay stage" H_OVERLAY
  row "  domain stage (define + start)" H_DOMAIN
  row "  address stage (start -> lease)" H_ADDRESS
  row "  finish stage (ssh + script)" H_FINISH
  row "  publish -> job.succeeded" H_TOTAL
  row "  guest uptime at sshd" H_SSHD
  echo "plain virsh + ssh"
  row "  overlay (vol-create-as)" P_OVERLAY
  row "  define + start" P_DOMAIN
  row "  start -> lease" P_ADDRESS
  row "  lease -> first login" P_LOGIN
  row "  lease -> script done" P_FINISH
  row "  total" P_TOTAL
  row "  guest uptime at sshd" P_SSHD
}

cleanup() {
  local pid q i
  for pid in ${FOLLOWER:-} ${WORKER:-}; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for ((i = 1; i <= RUNS; i++)); do remove_plain "bench-p$i"; done
  if [[ -n ${PREFIX:-} ]]; then
    for q in jobs jobs.e2e dead delay batches cancellations; do
      rabbitmqctl -q delete_queue "$PREFIX.$q" >/dev/null 2>&1 || true
    done
  fi
  rm -rf "$TMP"
  "$HERE/env.sh" down
}

main() {
  [[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive number"
  # shellcheck disable=SC2034 # filled and read through namerefs
  H_QUEUE=() H_OVERLAY=() H_DOMAIN=() H_ADDRESS=() H_FINISH=() H_TOTAL=() H_SSHD=()
  P_OVERLAY=() P_DOMAIN=() P_ADDRESS=() P_LOGIN=() P_FINISH=() P_TOTAL=() P_SSHD=()
  if [[ -z ${HATCHERY_BIN:-} ]]; then
    log "building hatchery (release)"
    (cd "$ROOT" && cargo build --release --quiet)
  fi
  BIN=${HATCHERY_BIN:-$(cd "$ROOT" && pwd)/target/release/hatchery}
  [[ -x $BIN ]] || die "no hatchery binary at $BIN"
  load_env "$("$HERE/env.sh" up)"
  TMP=$(mktemp -d)
  trap cleanup EXIT
  start_fleet

  local i
  for ((i = 1; i <= RUNS; i++)); do
    log "run $i of $RUNS: hatchery"
    hatchery_run "$i"
    log "run $i of $RUNS: plain virsh + ssh"
    plain_run "$i"
  done
  report
}

main "$@"
