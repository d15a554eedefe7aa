#!/usr/bin/env bash
# A private libvirt world for hatchery's real-VM tests, inside a network namespace.
#
# Usage: env.sh up | down | status | exec CMD... | env | restart-libvirtd
#
#   up      clean up whatever an earlier run left, build (or reuse) the guest image, then start
#           libvirtd in the namespace with a DHCP network, a network without DHCP, a storage
#           pool holding the base image, and a relay to the root namespace's RabbitMQ. Prints
#           the path of the env file (KEY=VALUE lines; a value is the rest of its line, verbatim,
#           never quoted) on stdout.
#   down    stop everything `up` started and delete the namespace; the image cache stays
#   status  show what is running; exit 1 when the environment is not up
#   exec    run a command inside the namespace (where the guests are reachable)
#   env     print the env file
#   restart-libvirtd
#           stop the namespace's libvirtd and start it again on the same state: guests, networks
#           and their dnsmasq keep running, and the new daemon takes them over (fault tests)
#
# Settings (environment): HATCHERY_E2E_STATE (default /tmp/hatchery-e2e; keep it short, unix
# socket paths are limited to 108 bytes), HATCHERY_E2E_CACHE (default target/vm-cache in the
# repository), HATCHERY_E2E_NS (default hatchery-e2e), HATCHERY_E2E_SUBNET (default 10.77).
#
# Network rule: every address used here exists only inside the namespace. The root namespace
# gets no bridge, no route and no libvirt network; its libvirt, if any, is never contacted.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly HERE
readonly STATE=${HATCHERY_E2E_STATE:-/tmp/hatchery-e2e}
readonly CACHE=${HATCHERY_E2E_CACHE:-$(cd "$HERE/../.." && pwd)/target/vm-cache}
readonly NS=${HATCHERY_E2E_NS:-hatchery-e2e}
readonly SUBNET=${HATCHERY_E2E_SUBNET:-10.77}
readonly NET=$NS-net NET_NODHCP=$NS-nodhcp POOL=$NS-pool BASE_VOLUME=hatchery-base.qcow2
readonly SOCK=$STATE/run/libvirt-sock AMQP_SOCK=$STATE/amqp.sock
readonly URI="qemu+unix:///system?socket=$SOCK"
readonly CMDLINE="console=ttyS0 quiet panic=-1"

log() { printf '[env %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
virsh_() { virsh -q -c "$URI" "$@"; }

preflight() {
  [[ $(id -u) == 0 ]] || die "run as root (network namespaces and libvirtd need it)"
  [[ $NS == hatchery-e2e* ]] || die "namespace name must start with hatchery-e2e"
  local c
  for c in ip unshare flock libvirtd virsh qemu-system-x86_64 qemu-img dnsmasq socat \
    iptables mke2fs cpio ssh-keygen; do
    command -v "$c" >/dev/null || die "missing $c (see tests/vm/README.md)"
  done
}

# Serialise up and down: parallel test processes may each try to bring the world up. Every
# daemon started below closes fd 8, or it would hold the lock for as long as it runs.
take_lock() { exec 8>"$STATE.lock" && flock 8; }

# exact name: grep -w would take hatchery-e2e-other for hatchery-e2e
ns_exists() { ip netns list | awk '{print $1}' | grep -qxF "$NS"; }

# The root-namespace relay is the only process of ours outside the namespace. Find it by its
# exact command line (it names our socket), which also works when a crash lost the state dir.
kill_relay() {
  local f pid
  for f in /proc/[0-9]*/cmdline; do
    # processes come and go while we read: a vanished one is simply not ours
    if { tr '\0' ' ' <"$f"; } 2>/dev/null | grep -qF "UNIX-LISTEN:$AMQP_SOCK,"; then
      pid=${f#/proc/} && pid=${pid%/cmdline}
      kill "$pid" 2>/dev/null || true
    fi
  done
}

# Everything inside the namespace was started by this script or by a test using it (libvirtd,
# dnsmasq, qemu, relays, workers), so it all goes: TERM first, KILL what is left after 5 s.
teardown() {
  kill_relay
  if ns_exists; then
    local pids _
    pids=$(ip netns pids "$NS")
    if [[ -n $pids ]]; then
      log "stopping $(wc -w <<<"$pids") processes in namespace $NS"
      # shellcheck disable=SC2086 # one pid per word
      kill $pids 2>/dev/null || true
      for _ in $(seq 50); do
        [[ -z $(ip netns pids "$NS") ]] && break
        sleep 0.1
      done
      pids=$(ip netns pids "$NS")
      # shellcheck disable=SC2086
      [[ -z $pids ]] || kill -9 $pids 2>/dev/null || true
    fi
    ip netns del "$NS"
  fi
  rm -rf "$STATE"
}

write_libvirt_config() {
  mkdir -p "$STATE"/{etc,run,lib,log,pool,boot,console} "$CACHE/libvirt-cache"
  cat >"$STATE/etc/libvirtd.conf" <<'EOF'
unix_sock_rw_perms = "0770"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
EOF
  # There is no virtlogd (no systemd to socket-activate it): qemu writes its logs itself.
  # qemu runs as root because /dev/kvm here is root-only: probing (as root) sees KVM while the
  # cache check (as libvirt-qemu) does not, so libvirt re-probed qemu, 4 s, on every call.
  printf '%s\n' 'stdio_handler = "file"' 'user = "root"' 'group = "root"' >"$STATE/etc/qemu.conf"
  : >"$STATE/etc/libvirt.conf"
}

# libvirtd runs in the namespace and in a mount namespace of its own, where its config, run,
# state and log directories are ours. A tmpfs over /run keeps /run/libvirt off the host. The
# qemu capability cache lives in CACHE: probing qemu from cold costs about 8 s per start.
start_libvirtd() {
  ip netns add "$NS"
  ip -n "$NS" link set lo up
  start_libvirtd_daemon
}

start_libvirtd_daemon() {
  ip netns exec "$NS" unshare -m --propagation private /bin/sh -ec "
    mount -t tmpfs tmpfs /run
    mkdir /run/libvirt
    mount --bind '$STATE/run' /run/libvirt
    mount --bind '$STATE/etc' /etc/libvirt
    mount --bind '$STATE/lib' /var/lib/libvirt
    mount --bind '$STATE/log' /var/log/libvirt
    mount --bind '$CACHE/libvirt-cache' /var/cache/libvirt
    exec libvirtd --daemon --pid-file /run/libvirt/libvirtd.pid" 8>&-
  local _
  for _ in $(seq 300); do
    virsh_ version >/dev/null 2>&1 && return
    sleep 0.1
  done
  die "libvirtd did not answer on $SOCK within 30 s; see $STATE/log/libvirtd.log"
}

# A NAT network with DHCP for the guests, and one without DHCP (and without dnsmasq at all)
# for the test where no lease ever comes. NAT leads nowhere: the namespace has no uplink.
define_networks() {
  # no-ping: dnsmasq otherwise pings an address for ~3 s before offering it
  cat >"$STATE/net.xml" <<EOF
<network xmlns:dnsmasq='http://libvirt.org/schemas/network/dnsmasq/1.0'>
  <name>$NET</name>
  <forward mode='nat'/>
  <bridge name='hatch-e2e0' stp='off' delay='0'/>
  <ip address='$SUBNET.0.1' netmask='255.255.255.0'>
    <dhcp><range start='$SUBNET.0.100' end='$SUBNET.0.199'/></dhcp>
  </ip>
  <dnsmasq:options><dnsmasq:option value='no-ping'/></dnsmasq:options>
</network>
EOF
  cat >"$STATE/net-nodhcp.xml" <<EOF
<network>
  <name>$NET_NODHCP</name>
  <bridge name='hatch-e2e1' stp='off' delay='0'/>
  <dns enable='no'/>
  <ip address='$SUBNET.1.1' netmask='255.255.255.0'/>
</network>
EOF
  local n
  for n in net net-nodhcp; do virsh_ net-define "$STATE/$n.xml" >/dev/null; done
  virsh_ net-start "$NET" >/dev/null
  virsh_ net-start "$NET_NODHCP" >/dev/null
}

# The pool is a directory in STATE holding a fresh copy of the base image, so a test that
# damages its pool never damages the cache. Kernel, initrd and known_hosts are copied too, so
# that the environment stays consistent even if the cached image is rebuilt while it runs.
define_pool() {
  # under the build lock: a concurrent build-image.sh may be swapping the image in
  local img=$CACHE/image
  flock "$CACHE/.build.lock" sh -c "cp '$img/base.qcow2' '$STATE/pool/$BASE_VOLUME' &&
    cp '$img/vmlinuz' '$img/initrd.img' '$img/known_hosts' '$img/image.env' '$STATE/boot/'"
  virsh_ pool-define-as "$POOL" dir --target "$STATE/pool" >/dev/null
  virsh_ pool-start "$POOL" >/dev/null
  virsh_ vol-info --pool "$POOL" "$BASE_VOLUME" >/dev/null
}

# A worker inside the namespace cannot reach the root namespace's 127.0.0.1:5672. A unix socket
# is a file and crosses namespaces: root socat (file -> broker) plus namespace socat
# (127.0.0.1:5672 in the namespace -> file) give it a broker on its own loopback.
start_amqp_relay() {
  # setsid: the relays must outlive this script and its terminal
  setsid socat "UNIX-LISTEN:$AMQP_SOCK,fork,mode=600" TCP:127.0.0.1:5672 \
    </dev/null >>"$STATE/log/amqp-relay.log" 2>&1 8>&- &
  ip netns exec "$NS" setsid socat TCP-LISTEN:5672,bind=127.0.0.1,reuseaddr,fork \
    "UNIX-CONNECT:$AMQP_SOCK" </dev/null >>"$STATE/log/amqp-relay.log" 2>&1 8>&- &

  # end-to-end check: RabbitMQ answers a bad protocol header with its own, "AMQP...". The
  # namespace side needs a moment to bind, hence the retries.
  local _ reply
  for _ in $(seq 50); do
    reply=$(ip netns exec "$NS" timeout 2 bash -c \
      'exec 3<>/dev/tcp/127.0.0.1/5672 && printf "HATCHERY" >&3 && head -c 4 <&3' \
      2>/dev/null) && [[ $reply == AMQP ]] && return
    sleep 0.1
  done
  log "warning: no AMQP broker reachable through the relay (is RabbitMQ on 127.0.0.1:5672?)"
}

write_env() {
  # image.env brings BASE_SHA256, BASE_CAPACITY_BYTES, SSH_USER, SSH_PASSWORD, ...
  {
    grep -v '^INPUTS_SHA256=' "$STATE/boot/image.env"
    cat <<EOF
STATE_DIR=$STATE
NETNS=$NS
NETNS_EXEC=ip netns exec $NS
LIBVIRT_URI=$URI
LIBVIRT_SOCKET=$SOCK
DOMAIN_TYPE=qemu
POOL=$POOL
POOL_PATH=$STATE/pool
BASE_VOLUME=$BASE_VOLUME
BASE_PATH=$STATE/pool/$BASE_VOLUME
KERNEL=$STATE/boot/vmlinuz
INITRD=$STATE/boot/initrd.img
CMDLINE=$CMDLINE
NETWORK=$NET
NETWORK_NODHCP=$NET_NODHCP
NETWORK_GATEWAY=$SUBNET.0.1
CONSOLE_DIR=$STATE/console
SSH_KEY=$CACHE/keys/id_ed25519
SSH_KEY_RSA=$CACHE/keys/id_rsa
SSH_KNOWN_HOSTS=$STATE/boot/known_hosts
AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f
AMQP_RELAY_SOCKET=$AMQP_SOCK
EOF
  } >"$STATE/env.tmp"
  mv "$STATE/env.tmp" "$STATE/env"
}

cmd_up() {
  preflight
  mkdir -p "$(dirname "$STATE")"
  take_lock
  local t0=$SECONDS
  teardown
  "$HERE/build-image.sh" "$CACHE"
  write_libvirt_config
  start_libvirtd
  define_networks
  define_pool
  start_amqp_relay
  write_env
  log "up in $((SECONDS - t0)) s: namespace $NS, $URI"
  echo "$STATE/env"
}

cmd_down() {
  preflight
  take_lock
  teardown
  log "down: namespace $NS and $STATE removed"
}

# The daemon's state lives in STATE (run, lib), so a new daemon finds the running guests and
# networks there. Only libvirtd goes: qemu and dnsmasq are its children no longer once started.
cmd_restart_libvirtd() {
  preflight
  take_lock
  ns_exists || die "namespace $NS is not up"
  local pid _
  pid=$(cat "$STATE/run/libvirtd.pid") || die "no libvirtd pid file in $STATE/run"
  kill "$pid"
  for _ in $(seq 150); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
  start_libvirtd_daemon
  log "libvirtd restarted in namespace $NS"
}

cmd_status() {
  local ok=0
  if ns_exists; then log "namespace $NS: present"; else log "namespace $NS: absent" && ok=1; fi
  if virsh_ version >/dev/null 2>&1; then
    log "libvirtd: answering on $SOCK"
    virsh_ net-list --all >&2
    virsh_ pool-list --all >&2
    virsh_ list --all >&2
  else
    log "libvirtd: not answering"
    ok=1
  fi
  if ns_exists; then log "processes in namespace: $(ip netns pids "$NS" | wc -l)"; fi
  [[ -f $STATE/env ]] && log "env file: $STATE/env" || ok=1
  return $ok
}

main() {
  case ${1:-} in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  exec) shift && exec ip netns exec "$NS" "$@" ;;
  env) cat "$STATE/env" ;;
  restart-libvirtd) cmd_restart_libvirtd ;;
  *) sed -n '2,23s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2 && exit 2 ;;
  esac
}

main "$@"
