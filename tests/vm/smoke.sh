#!/usr/bin/env bash
# Prove the real-VM test environment by hand, the way hatchery will use it: an overlay volume on
# the base image, a TCG domain booted from kernel and initrd, a DHCP lease, SSH logins from inside
# the namespace (key and password, root and hatch), a detached script, then a graceful shutdown.
#
# Usage: smoke.sh [--keep]    (--keep leaves the environment up afterwards)
# Runs `env.sh up` first and `env.sh down` at the end. Prints the timings it measured.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly HERE
readonly VM=hatchery-smoke MAC=52:54:00:77:00:51
readonly VM2=hatchery-smoke-nodhcp MAC2=52:54:00:77:00:52
declare -A E # the env file written by env.sh up

log() { printf '[smoke %s] %s\n' "$(date +%T.%3N)" "$*" >&2; }
die() {
  log "FAILED: $*"
  local console=${E[CONSOLE_DIR]:-/nonexistent}/$VM.log
  [[ -f $console ]] && sed 's/^/  console| /' "$console" >&2
  exit 1
}
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
virsh_() { virsh -q -c "${E[LIBVIRT_URI]}" "$@"; }

# KEY=VALUE, the value being the rest of the line: the same parsing the Rust test does.
load_env() {
  local key value
  while IFS='=' read -r key value; do E[$key]=$value; done <"$1"
}

# create_overlay NAME: a qcow2 volume NAME.qcow2 backed by the base image
create_overlay() {
  virsh_ vol-create "${E[POOL]}" /dev/stdin >/dev/null <<EOF
<volume>
  <name>$1.qcow2</name>
  <capacity unit='bytes'>${E[BASE_CAPACITY_BYTES]}</capacity>
  <target><format type='qcow2'/></target>
  <backingStore><path>${E[BASE_PATH]}</path><format type='qcow2'/></backingStore>
</volume>
EOF
}

# <acpi/> matters: without it libvirt starts qemu with ACPI off, and `virsh shutdown` (the power
# button) never reaches the guest. Usage: define_domain NAME MAC NETWORK
define_domain() {
  virsh_ define /dev/stdin >/dev/null <<EOF
<domain type='${E[DOMAIN_TYPE]}'>
  <name>$1</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>${E[KERNEL]}</kernel>
    <initrd>${E[INITRD]}</initrd>
    <cmdline>${E[CMDLINE]} hatchery.hostname=$1</cmdline>
  </os>
  <features><acpi/></features>
  <devices>
    <disk type='volume' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source pool='${E[POOL]}' volume='$1.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='network'>
      <source network='$3'/>
      <mac address='$2'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'>
      <source path='${E[CONSOLE_DIR]}/$1.log'/>
      <target port='0'/>
    </serial>
  </devices>
</domain>
EOF
}

wait_for_lease() {
  local deadline=$((SECONDS + 60))
  while ((SECONDS < deadline)); do
    IP=$(virsh_ net-dhcp-leases "${E[NETWORK]}" --mac "$MAC" |
      awk '{ sub(/\/.*/, "", $5); print $5 }')
    [[ -n $IP ]] && return
    sleep 0.1
  done
  die "no DHCP lease within 60 s"
}

# Every SSH connection starts inside the namespace: the guest's address exists only there.
ssh_key() {
  ip netns exec "${E[NETNS]}" ssh -F /dev/null -i "$1" -o BatchMode=yes -o ConnectTimeout=3 \
    -o StrictHostKeyChecking=yes -o UserKnownHostsFile="${E[SSH_KNOWN_HOSTS]}" \
    -o LogLevel=ERROR "$2@$IP" "${@:3}"
}

# OpenSSH reads a password only from a terminal or from SSH_ASKPASS; the latter needs no tty.
ssh_password() {
  SSH_ASKPASS=$ASKPASS SSH_ASKPASS_REQUIRE=force ip netns exec "${E[NETNS]}" ssh -F /dev/null \
    -o PreferredAuthentications=password,keyboard-interactive -o PubkeyAuthentication=no \
    -o NumberOfPasswordPrompts=1 -o ConnectTimeout=3 -o StrictHostKeyChecking=yes \
    -o UserKnownHostsFile="${E[SSH_KNOWN_HOSTS]}" -o LogLevel=ERROR "$1@$IP" "${@:2}" </dev/null
}

wait_for_ssh() {
  local deadline=$((SECONDS + 60))
  until ssh_key "${E[SSH_KEY]}" root true 2>/dev/null; do
    ((SECONDS < deadline)) || die "no SSH login within 60 s of the lease"
    sleep 0.1
  done
}

check_logins() {
  [[ $(ssh_key "${E[SSH_KEY_RSA]}" root id -u) == 0 ]] || die "RSA key login as root"
  [[ $(ssh_password root id -u) == 0 ]] || die "password login as root"
  [[ $(ssh_password "${E[SSH_USER_UNPRIVILEGED]}" id -un) == hatch ]] ||
    die "password login as hatch"
  [[ $(ssh_key "${E[SSH_KEY]}" hatch id -un) == hatch ]] || die "key login as hatch"
  [[ $(ssh_key "${E[SSH_KEY]}" hatch "echo '${E[SSH_PASSWORD]}' | sudo -S -p '' id -u") == 0 ]] ||
    die "sudo as hatch"
  log "logins ok: ed25519 and RSA keys, passwords for root and hatch, sudo for hatch"
}

# The finish step's pattern: upload a script, start it detached, come back later for its result.
check_detached_script() {
  ssh_key "${E[SSH_KEY]}" root 'cat >/var/tmp/finish.sh' <<'EOF'
sleep 1
uname -r >/tmp/finish.out
echo done >>/tmp/finish.out
EOF
  ssh_key "${E[SSH_KEY]}" root \
    'nohup setsid sh /var/tmp/finish.sh >/tmp/finish.log 2>&1 </dev/null & echo started'
  local _
  for _ in $(seq 50); do
    ssh_key "${E[SSH_KEY]}" root 'grep -q done /tmp/finish.out 2>/dev/null' && break
    sleep 0.2
  done
  ssh_key "${E[SSH_KEY]}" root 'cat /tmp/finish.out' | sed 's/^/  guest| /' >&2
  ssh_key "${E[SSH_KEY]}" root 'grep -q done /tmp/finish.out' ||
    die "detached script did not finish"
  log "detached script ok"
}

check_file_transfer() {
  echo "payload $$" >"$TMP/payload"
  ip netns exec "${E[NETNS]}" scp -q -F /dev/null -i "${E[SSH_KEY]}" -o BatchMode=yes \
    -o UserKnownHostsFile="${E[SSH_KNOWN_HOSTS]}" "$TMP/payload" "root@$IP:/tmp/sftp" ||
    die "scp over sftp"
  ip netns exec "${E[NETNS]}" scp -O -q -F /dev/null -i "${E[SSH_KEY]}" -o BatchMode=yes \
    -o UserKnownHostsFile="${E[SSH_KNOWN_HOSTS]}" "$TMP/payload" "root@$IP:/tmp/scp" ||
    die "legacy scp"
  [[ $(ssh_key "${E[SSH_KEY]}" root 'cat /tmp/sftp /tmp/scp | uniq') == "payload $$" ]] ||
    die "transferred files differ"
  log "file transfer ok: sftp and legacy scp"
}

shutdown_gracefully() {
  virsh_ shutdown "$VM" >/dev/null
  local deadline=$((SECONDS + 30))
  until [[ $(virsh_ domstate "$VM") == "shut off" ]]; do
    ((SECONDS < deadline)) || die "guest ignored the ACPI power button for 30 s"
    sleep 0.1
  done
}

# On the network without DHCP the guest boots (its sshd comes up) but never gets a lease.
check_no_lease() {
  create_overlay "$VM2"
  define_domain "$VM2" "$MAC2" "${E[NETWORK_NODHCP]}"
  virsh_ start "$VM2" >/dev/null
  local deadline=$((SECONDS + 60))
  until grep -q "${E[SSHD_MARKER]}" "${E[CONSOLE_DIR]}/$VM2.log" 2>/dev/null; do
    ((SECONDS < deadline)) || die "guest on ${E[NETWORK_NODHCP]} did not boot"
    sleep 0.2
  done
  sleep 3 # udhcpc asks once a second
  [[ -z $(virsh_ net-dhcp-leases "${E[NETWORK_NODHCP]}") ]] || die "lease on the no-DHCP network"
  virsh_ destroy "$VM2" >/dev/null
  log "no-DHCP network ok: guest booted, no lease"
}

cleanup() {
  local vm
  for vm in "$VM" "$VM2"; do
    virsh_ destroy "$vm" >/dev/null 2>&1 || true
    virsh_ undefine "$vm" >/dev/null 2>&1 || true
    virsh_ vol-delete --pool "${E[POOL]}" "$vm.qcow2" >/dev/null 2>&1 || true
  done
  rm -rf "$TMP"
  [[ $KEEP == 1 ]] || "$HERE/env.sh" down
}

main() {
  KEEP=0
  [[ ${1:-} == --keep ]] && KEEP=1
  local t_up t0 t_started t_lease t_ssh t_done t_off sshd_at
  t_up=$(now)
  load_env "$("$HERE/env.sh" up)"
  TMP=$(mktemp -d)
  trap cleanup EXIT
  printf '#!/bin/sh\necho %s\n' "${E[SSH_PASSWORD]}" >"$TMP/askpass"
  chmod 0700 "$TMP/askpass"
  ASKPASS=$TMP/askpass

  create_overlay "$VM"
  define_domain "$VM" "$MAC" "${E[NETWORK]}"
  t0=$(now)
  virsh_ start "$VM" >/dev/null
  t_started=$(now)
  wait_for_lease
  t_lease=$(now)
  log "lease $IP for $MAC"
  wait_for_ssh
  t_ssh=$(now)
  sshd_at=$(awk '/HATCHERY-SSHD-UP/ { print $2; exit }' "${E[CONSOLE_DIR]}/$VM.log")

  check_logins
  check_detached_script
  check_file_transfer
  t_done=$(now)
  shutdown_gracefully
  t_off=$(now)
  check_no_lease

  # writes went to the overlay, never to the base
  [[ $(sha256sum "${E[BASE_PATH]}" | cut -d' ' -f1) == "${E[BASE_SHA256]}" ]] ||
    die "the base image changed"
  log "timings (s): env up $(secs "$t_up" "$t0"), virsh start $(secs "$t0" "$t_started")," \
    "start to lease $(secs "$t0" "$t_lease"), lease to ssh $(secs "$t_lease" "$t_ssh")," \
    "guest uptime at sshd $sshd_at, checks $(secs "$t_ssh" "$t_done")," \
    "acpi shutdown $(secs "$t_done" "$t_off")"
  log "PASSED"
}

main "$@"
