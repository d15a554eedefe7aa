#!/usr/bin/env bash
# Build the tiny guest that hatchery's real-VM tests boot: a Debian cloud kernel for direct kernel
# boot, a busybox initramfs that mounts /dev/vda as root, and a small qcow2 base image holding
# busybox, dropbear (key and password logins), sftp-server, scp, sudo and a DHCP client script.
#
# Usage: build-image.sh CACHE_DIR
#
# Everything comes from Debian packages fetched with `apt-get download` and unpacked with
# `dpkg-deb -x`; nothing is installed on the host and nothing is loop-mounted (the filesystem is
# written by `mke2fs -d`). The result lands in CACHE_DIR/image and is rebuilt only when this
# script, a file in guest/ or a package version changes; CACHE_DIR/keys holds the client and
# guest host keys, made once per cache.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly HERE GUEST=$HERE/guest # files that go into the guest as they are
readonly PASSWORD=Kq7-test-only-pw # for root and hatch; a test image, never a real secret
readonly FS_SIZE=64M
readonly KERNEL_META=linux-image-cloud-amd64
readonly GUEST_PKGS=(busybox-static dropbear-bin libtomcrypt1 libtommath1 libgmp10 libc6
  libcrypt1 zlib1g openssh-sftp-server openssh-client
  sudo libpam0g libpam-modules libaudit1 libcap-ng0 libselinux1 libpcre2-8-0)
# the virtio devices libvirt gives a guest, plus the ACPI power button for `virsh shutdown`
readonly MODULES=(virtio_pci virtio_blk virtio_net virtio-rng button evdev)

log() { printf '[build-image] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Packages and versions as apt would fetch them now, in one apt-cache call (each call costs a
# second here); the versions feed the cache key.
package_info() {
  apt-cache show --no-all-versions "$KERNEL_META" "${GUEST_PKGS[@]}" 2>/dev/null |
    awk '$1 == "Package:" {p = $2} $1 == "Version:" {print p, $2}
      p == meta && $1 == "Depends:" {sub(/\)$/, "", $4); print "kernel", $2, $4}' \
      meta="$KERNEL_META"
}

resolve_packages() {
  local info
  info=$(package_info) || true
  if [[ $info != *"$KERNEL_META "* ]]; then
    log "apt lists are missing or stale, updating them"
    apt-get update -qq
    info=$(package_info) || die "apt-cache cannot show the guest packages"
  fi
  # the metapackage names the versioned kernel package, pinned to its own version
  local kpkg kv
  read -r _ kpkg kv < <(grep '^kernel ' <<<"$info")
  [[ $kpkg == linux-image-* ]] || die "cannot resolve $KERNEL_META to a kernel package"
  KVER=${kpkg#linux-image-}
  VERSIONS=("$kpkg=$kv")
  mapfile -t -O 1 VERSIONS < <(awk -v meta="$KERNEL_META" \
    '$1 != "kernel" && $1 != meta {print $1 "=" $2}' <<<"$info")
  ((${#VERSIONS[@]} == ${#GUEST_PKGS[@]} + 1)) || die "apt does not know every guest package"
}

# Client keys are made once per cache; the image embeds their public halves. RSA is written in
# PEM because libssh2 builds without OpenSSH-format RSA support still exist.
ensure_keys() {
  mkdir -p "$KEYS"
  [[ -f $KEYS/id_ed25519 ]] ||
    ssh-keygen -q -t ed25519 -N '' -C hatchery-e2e -f "$KEYS/id_ed25519"
  [[ -f $KEYS/id_rsa ]] ||
    ssh-keygen -q -t rsa -b 2048 -m PEM -N '' -C hatchery-e2e -f "$KEYS/id_rsa"
}

# Guest host keys are made once per cache too, so that rebuilding the image (a new package
# version) does not invalidate known_hosts files that tests already hold.
ensure_host_keys() {
  [[ -s $KEYS/known_hosts ]] && return
  local t
  for t in ed25519 rsa; do
    rm -f "$KEYS/dropbear_${t}_host_key"
    run_unpacked usr/bin/dropbearkey -t "$t" -f "$KEYS/dropbear_${t}_host_key" >/dev/null 2>&1
    run_unpacked usr/bin/dropbearkey -y -f "$KEYS/dropbear_${t}_host_key" |
      awk '/^ssh-/ {print "* " $1 " " $2}'
  done >"$KEYS/known_hosts.tmp"
  mv "$KEYS/known_hosts.tmp" "$KEYS/known_hosts"
}

inputs_hash() {
  { cat "$HERE/build-image.sh" "$GUEST"/*; printf '%s\n' "${VERSIONS[@]}"; cat "$KEYS"/*.pub; } |
    sha256sum | cut -d' ' -f1
}

# apt-get download names files NAME_VERSION_ARCH.deb with the epoch's colon as %3a.
deb_file() { compgen -G "$DEBS/${1%%=*}_$(v=${1#*=}; echo "${v//:/%3a}")_*.deb" | head -1; }

fetch_debs() {
  mkdir -p "$DEBS"
  local missing=() pv
  for pv in "${VERSIONS[@]}"; do [[ -n $(deb_file "$pv") ]] || missing+=("$pv"); done
  ((${#missing[@]} == 0)) && return
  log "downloading ${missing[*]}"
  # run from the cache dir: apt-get download writes to the current directory. As root it warns
  # that _apt cannot write there ("unsandboxed"); that is expected and harmless.
  (cd "$DEBS" && apt-get download -q "${missing[@]}" 2>&1) >"$WORK/apt.log" ||
    { grep -v unsandboxed "$WORK/apt.log" >&2; return 1; }
}

# Versions superseded by an update stay behind otherwise; the cache would only ever grow.
prune_debs() {
  local keep=" " pv f
  for pv in "${VERSIONS[@]}"; do keep+="$(deb_file "$pv") "; done
  for f in "$DEBS"/*.deb; do [[ $keep == *" $f "* ]] || rm -f "$f"; done
}

unpack_debs() {
  local pv
  for pv in "${VERSIONS[@]}"; do dpkg-deb -x "$(deb_file "$pv")" "$X"; done
  # not $X/lib64/...: that is an absolute symlink and would lead to the host's loader
  LDSO=$X/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
  # sudo finds its own library through a RUNPATH, which --list would resolve on the host
  LIBPATH=$X/lib/x86_64-linux-gnu:$X/usr/lib/x86_64-linux-gnu:$X/usr/libexec/sudo
}

# Run a dynamically linked tool from the unpacked tree (dropbearkey), not from the host.
run_unpacked() { "$LDSO" --library-path "$LIBPATH" "$X/$1" "${@:2}"; }

# Copy programs from the unpacked tree into the guest root with every library they load. The
# libraries must resolve inside the unpacked packages: one found on the host means a package
# is missing from GUEST_PKGS, and the guest would fail at run time instead of here.
copy_elf() {
  local f lib real
  for f in "$@"; do
    install -D -m 0755 "$X/$f" "$R/$f"
    while read -r lib; do
      real=$(readlink -f "$lib")
      [[ $real == "$X"/* ]] || die "$f needs $lib, which no guest package provides"
      [[ -e $R${lib#"$X"} ]] || install -D -m 0644 "$real" "$R${lib#"$X"}"
    done < <("$LDSO" --library-path "$LIBPATH" --list "$X/$f" |
      awk '/not found/ {print "missing:" $1; next} /=> \// {print $3}')
  done
  install -D -m 0755 "$LDSO" "$R/lib64/ld-linux-x86-64.so.2"
}

make_root() {
  mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,usr/lib,dev,proc,sys,run,mnt,var/log,var/run}
  mkdir -p "$R"/{etc/init.d,etc/dropbear,etc/acpi/PWRF,root/.ssh,home/hatch/.ssh}
  install -d -m 1777 "$R/tmp" "$R/var/tmp"

  # busybox provides the shell and the tools a finish script expects; link every applet
  install -m 0755 "$X/bin/busybox" "$R/bin/busybox"
  local applet
  for applet in $("$R/bin/busybox" --list-full); do
    [[ -e $R/$applet ]] || ln -s /bin/busybox "$R/$applet"
  done
  install -m 0755 "$GUEST/nohup" "$R/usr/bin/nohup" # Debian's busybox lacks the applet

  # dropbear looks for sftp-server at /usr/lib/sftp-server; scp serves `scp -t` requests
  copy_elf usr/sbin/dropbear usr/lib/openssh/sftp-server usr/bin/scp
  ln -s openssh/sftp-server "$R/usr/lib/sftp-server"
  # sudo for the unprivileged user; its policy plugin and PAM module are loaded with dlopen
  copy_elf usr/bin/sudo usr/libexec/sudo/sudoers.so lib/x86_64-linux-gnu/security/pam_unix.so
  chmod 4755 "$R/usr/bin/sudo"

  # host keys are baked in, so every boot of this base presents the same keys
  install -m 0600 "$KEYS"/dropbear_*_host_key "$R/etc/dropbear/"
  cp "$KEYS/known_hosts" "$OUT/known_hosts"

  cat "$KEYS"/id_ed25519.pub "$KEYS"/id_rsa.pub >"$R/root/.ssh/authorized_keys"
  cp "$R/root/.ssh/authorized_keys" "$R/home/hatch/.ssh/authorized_keys"
  chmod 0700 "$R/root" "$R/root/.ssh" "$R/home/hatch" "$R/home/hatch/.ssh"
  chmod 0600 "$R"/root/.ssh/authorized_keys "$R"/home/hatch/.ssh/authorized_keys
  chown -R 1000:1000 "$R/home/hatch"
  write_etc
}

write_etc() {
  # a fixed salt keeps the image reproducible; the password is public test data anyway
  local hash
  hash=$("$X/bin/busybox" mkpasswd -m sha512 -S hatcherye2e "$PASSWORD")
  printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' \
    'hatch:x:1000:1000:hatchery test user:/home/hatch:/bin/sh' >"$R/etc/passwd"
  printf '%s\n' 'root:x:0:' 'sudo:x:27:hatch' 'hatch:x:1000:' >"$R/etc/group"
  printf '%s\n' "root:$hash:19000:0:99999:7:::" "hatch:$hash:19000:0:99999:7:::" \
    >"$R/etc/shadow"
  chmod 0600 "$R/etc/shadow"
  echo /bin/sh >"$R/etc/shells" # dropbear refuses users whose shell is not listed here
  printf '%s\n' 'passwd: files' 'group: files' 'shadow: files' 'hosts: files' \
    >"$R/etc/nsswitch.conf"
  printf '127.0.0.1 localhost\n' >"$R/etc/hosts"
  install -D -m 0644 "$GUEST/pam-sudo" "$R/etc/pam.d/sudo"
  install -m 0440 "$GUEST/sudoers" "$R/etc/sudoers"
  echo hatchery-guest >"$R/etc/hostname"
  echo 'export PATH=/usr/sbin:/usr/bin:/sbin:/bin' >"$R/etc/profile"
  echo "$HASH" >"$R/etc/hatchery-base"

  install -m 0644 "$GUEST/inittab" "$R/etc/inittab"
  install -m 0755 "$GUEST/rcS" "$R/etc/init.d/rcS"
  install -m 0755 "$GUEST/udhcpc.script" "$R/etc/udhcpc.script"
  install -m 0755 "$GUEST/power-button" "$R/etc/acpi/PWRF/00000080"
}

# The kernel's virtio drivers are modules: list them with their dependencies, dependencies
# first, read from each module's own .modinfo "depends=" field (no depmod needed).
module_order() {
  local seen=" " order=()
  add_module() {
    local f deps d
    [[ $seen == *" $1 "* ]] && return
    seen+="$1 "
    f=$(find "$X/lib/modules/$KVER" -name "$1.ko*" | head -1)
    [[ -n $f ]] || die "kernel $KVER has no module $1"
    deps=$(tr '\0' '\n' <"$f" | sed -n 's/^depends=//p' | tr ',' ' ')
    for d in $deps; do add_module "$d"; done
    order+=("$f")
  }
  local m
  for m in "${MODULES[@]}"; do add_module "$m"; done
  printf '%s\n' "${order[@]}"
}

make_initramfs() {
  local I=$WORK/initrd f modules
  mkdir -p "$I"/{bin,dev,proc,sys,newroot,modules}
  cp "$X/bin/busybox" "$I/bin/busybox"
  install -m 0755 "$GUEST/init" "$I/init"
  modules=$(module_order)
  for f in $modules; do
    cp "$f" "$I/modules/"
    basename "$f" >>"$I/modules/order"
  done
  (cd "$I" && find . | cpio -o -H newc --quiet | gzip -9) >"$OUT/initrd.img"
}

make_disk() {
  mke2fs -q -t ext4 -L hatchery-root -N 4096 -E root_owner=0:0 -d "$R" \
    "$WORK/root.raw" "$FS_SIZE" >/dev/null
  qemu-img convert -q -c -O qcow2 "$WORK/root.raw" "$OUT/base.qcow2"
}

write_info() {
  cat >"$OUT/image.env" <<EOF
KERNEL_VERSION=$KVER
BASE_SHA256=$(sha256sum "$OUT/base.qcow2" | cut -d' ' -f1)
BASE_CAPACITY_BYTES=$(qemu-img info --output=json "$OUT/base.qcow2" |
    sed -n 's/.*"virtual-size": \([0-9]*\).*/\1/p' | head -1)
SSH_USER=root
SSH_USER_UNPRIVILEGED=hatch
SSH_PASSWORD=$PASSWORD
SSHD_MARKER=HATCHERY-SSHD-UP
INPUTS_SHA256=$HASH
EOF
  # host keys as base64 blobs, to compare with what an SSH library reports for the server
  awk '$2 == "ssh-ed25519" {print "SSH_HOST_KEY_ED25519=" $3}
    $2 == "ssh-rsa" {print "SSH_HOST_KEY_RSA=" $3}' "$OUT/known_hosts" >>"$OUT/image.env"
}

main() {
  [[ $# -eq 1 ]] || { echo "usage: $0 CACHE_DIR" >&2; exit 2; }
  mkdir -p "$1"
  CACHE=$(cd "$1" && pwd)
  DEBS=$CACHE/debs KEYS=$CACHE/keys
  # one build at a time per cache; a second caller waits, then finds the image ready
  exec 9>"$CACHE/.build.lock"
  flock 9

  resolve_packages
  ensure_keys
  HASH=$(inputs_hash)
  # the host keys are an input too: an image is stale if they were deleted and made anew
  if [[ $(cat "$CACHE/image/inputs.sha256" 2>/dev/null) == "$HASH" ]] &&
    cmp -s "$KEYS/known_hosts" "$CACHE/image/known_hosts"; then
    log "up to date: $CACHE/image"
    return
  fi

  local start=$SECONDS
  WORK=$(mktemp -d) && trap 'rm -rf "$WORK"' EXIT
  # a version that vanished from the archive means the lists are stale: refresh once, retry
  if ! fetch_debs; then
    log "download failed, refreshing apt lists and trying again"
    apt-get update -qq
    resolve_packages
    HASH=$(inputs_hash)
    fetch_debs || die "apt-get download failed"
  fi
  prune_debs
  X=$WORK/x R=$WORK/root OUT=$CACHE/image.new
  rm -rf "$OUT" && mkdir -p "$X" "$R" "$OUT"
  unpack_debs
  ensure_host_keys
  make_root
  make_disk
  make_initramfs
  cp "$X/boot/vmlinuz-$KVER" "$OUT/vmlinuz"
  write_info
  echo "$HASH" >"$OUT/inputs.sha256"

  # swap the finished image in whole, so a crash never leaves a half-built one in place
  rm -rf "$CACHE/image" && mv "$OUT" "$CACHE/image"
  log "built $CACHE/image in $((SECONDS - start)) s (kernel $KVER)"
}

main "$@"
