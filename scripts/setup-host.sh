#!/usr/bin/env bash
# Prepare a Debian 12 host (or CI runner) for agentgate development and tests.
#
#   * installs the Debian packages the project needs (bcc, bpftool, servers used
#     by the integration tests, packaging tools) -- without starting any system
#     service; tests start their own server instances in temp dirs;
#   * makes kernel headers available to bcc under /lib/modules/$(uname -r)/
#     (installing a Debian headers package and linking it if the running kernel
#     has no headers of its own);
#   * mounts tracefs at /sys/kernel/tracing and bpffs at /sys/fs/bpf.
#
# Idempotent: a second run does no apt work and prints nothing.
# Must run as root; never reads stdin (CI=true safe).
#
# Environment:
#   SETUP_HOST_HEADERS_PKG  force this kernel headers package (e.g.
#                           linux-headers-6.1.0-56-cloud-amd64) for the link fallback
#   SETUP_HOST_VERBOSE=1    stream apt output instead of logging it to a file
set -euo pipefail

log()  { echo "setup-host: $*"; }
warn() { echo "setup-host: warning: $*" >&2; }
die()  { echo "setup-host: error: $*" >&2; exit 1; }

[[ ${EUID} -eq 0 ]] || die "must run as root (try: sudo $0)"
command -v dpkg-query >/dev/null || die "not a Debian system (dpkg-query missing)"

PACKAGES=(
  # eBPF: bcc for the system interpreter (/usr/bin/python3), bpftool
  python3-bpfcc bpftool
  # Python venv / native builds
  python3-venv python3-dev build-essential libffi-dev
  # servers and clients used by integration tests (started in temp dirs)
  postgresql postgresql-contrib pgbouncer
  mariadb-server mariadb-client
  openssh-server openssh-client
  # SSH tests drive a shell on a pty with tmux
  tmux
  # tools
  curl iproute2 procps git ca-certificates
  # asciicast exports are checked with asciinema; HTTP: a load generator for bench/http.py
  wrk asciinema
  # MySQL: Debian's mariadb-test suite (mtr, run --extern against tests/mysql_server.py),
  # and the load generator for bench/mysql.py
  mariadb-test sysbench
  # packaging (.deb / .rpm)
  dpkg-dev rpm
)

KREL=$(uname -r)
KDIR=/lib/modules/${KREL}
ARCH=$(dpkg --print-architecture)
HEADERS_FLAVOUR=cloud-${ARCH}

APT_LOG=""
POLICY=/usr/sbin/policy-rc.d
POLICY_BAK=/usr/sbin/policy-rc.d.setup-host-orig
POLICY_MARK="# written by agentgate scripts/setup-host.sh"
POLICY_INSTALLED=0

cleanup() {
  if [[ ${POLICY_INSTALLED} -eq 1 ]]; then
    restore_policy_rc_d
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- helpers ---

# Print the names (from "$@") that are not fully installed ("ii").
missing_packages() {
  local -A ok=()
  local name status
  while IFS=$'\t' read -r name status; do
    [[ ${status} == "ii " ]] && ok[${name%%:*}]=1
  done < <(dpkg-query -W -f='${Package}\t${db:Status-Abbrev}\n' "$@" 2>/dev/null || true)
  for name in "$@"; do
    [[ -n ${ok[${name}]:-} ]] || echo "${name}"
  done
}

# bcc (0.26) looks for headers like this: if both build/ and source/ are
# directories it runs clang in source/ and adds build/ include dirs (Debian's
# split arch-specific + "-common" layout); otherwise it uses build/ alone.
kernel_headers_ok() {
  local src=${KDIR}/build
  if [[ -d ${KDIR}/build && -d ${KDIR}/source ]]; then
    src=${KDIR}/source
  fi
  [[ -f ${src}/include/linux/kconfig.h && -f ${KDIR}/build/include/generated/autoconf.h ]]
}

restore_policy_rc_d() {
  rm -f "${POLICY}"
  if [[ -e ${POLICY_BAK} ]]; then
    mv -f "${POLICY_BAK}" "${POLICY}"
  fi
  POLICY_INSTALLED=0
}

# Keep package maintainer scripts from starting system services (postgresql,
# mariadb, ssh): invoke-rc.d / deb-systemd-invoke honour policy-rc.d exit 101.
install_policy_rc_d() {
  # Left over from an interrupted run? Put the original back first.
  if [[ -f ${POLICY} ]] && grep -qF "${POLICY_MARK}" "${POLICY}"; then
    restore_policy_rc_d
  fi
  if [[ -e ${POLICY} ]]; then
    mv -f "${POLICY}" "${POLICY_BAK}"
  fi
  POLICY_INSTALLED=1
  printf '#!/bin/sh\n%s\nexit 101\n' "${POLICY_MARK}" >"${POLICY}"
  chmod 0755 "${POLICY}"
}

run_apt() {
  if [[ ${SETUP_HOST_VERBOSE:-0} == 1 ]]; then
    "$@" </dev/null
  else
    "$@" </dev/null >>"${APT_LOG}" 2>&1
  fi
}

APT_UPDATED=0
apt_update() {
  [[ ${APT_UPDATED} -eq 1 ]] && return 0
  APT_UPDATED=1
  [[ -n ${APT_LOG} ]] || APT_LOG=$(mktemp /tmp/setup-host-apt.XXXXXX.log)
  log "updating apt package lists"
  if ! run_apt apt-get update -o DPkg::Lock::Timeout=300; then
    warn "apt-get update failed (see ${APT_LOG}); continuing with the existing lists"
  fi
}

# Version of a linux-headers-<ver>-<flavour> package name.
headers_pkg_version() {
  local v=${1#linux-headers-}
  echo "${v%-"${HEADERS_FLAVOUR}"}"
}

# Newest installed linux-headers-*-<flavour> package, if any.
installed_headers_pkg() {
  dpkg-query -W -f='${Package}\t${db:Status-Abbrev}\n' "linux-headers-*-${HEADERS_FLAVOUR}" 2>/dev/null \
    | awk -F'\t' -v re="^linux-headers-[0-9]+[.][0-9]+[.][0-9].*-${HEADERS_FLAVOUR}\$" '$2 == "ii " && $1 ~ re {print $1}' \
    | sort -V | tail -n1 || true
}

# Pick the headers package to install from the apt lists (versioned packages
# only, not the linux-headers-X.Y-<flavour> meta-packages): the newest version
# not newer than the running kernel (else the oldest newer one), skipping
# packages that drag in a kernel image -- bookworm's 6.12 backport headers
# depend on linux-image-*, which would pull initramfs-tools, udev, a systemd
# upgrade ... into the machine (and bcc 0.26 + clang 14 cope worse with 6.12
# headers anyway: more warnings, and <linux/bpf.h> no longer compiles).
choose_headers_pkg() {
  local kver_mm candidates=() below=() above=() pkg v mm
  kver_mm=$(sed -E 's/^([0-9]+\.[0-9]+).*/\1/' <<<"${KREL}")
  mapfile -t candidates < <(apt-cache search --names-only "^linux-headers-[0-9]+[.][0-9]+[.][0-9].*-${HEADERS_FLAVOUR}\$" \
                              | awk '{print $1}' | sort -V)
  for pkg in "${candidates[@]}"; do
    v=$(headers_pkg_version "${pkg}")
    mm=$(sed -E 's/^([0-9]+\.[0-9]+).*/\1/' <<<"${v}")
    if [[ $(printf '%s\n%s\n' "${mm}" "${kver_mm}" | sort -V | tail -n1) == "${kver_mm}" ]]; then
      below+=("${pkg}")
    else
      above+=("${pkg}")
    fi
  done
  # preference order: below (newest first), then above (oldest first)
  local ordered=()
  for ((i = ${#below[@]} - 1; i >= 0; i--)); do ordered+=("${below[i]}"); done
  ordered+=("${above[@]}")
  for pkg in "${ordered[@]}"; do
    # (dependencies can be indirect, so ask apt what it would install)
    if apt-get install -s --no-install-recommends "${pkg}" </dev/null 2>/dev/null \
        | grep -q '^Inst linux-image-'; then
      continue
    fi
    echo "${pkg}"
    return 0
  done
  return 1
}

# Link /lib/modules/$KREL/{build,source} to the directories of headers package $1,
# the same targets the package uses for its own /lib/modules/<ver>/ links:
# build -> the arch-specific dir (config, generated headers),
# source -> the "-common" dir (the full include/ tree).
link_kernel_headers() {
  local pkg=$1 hver build source
  hver=${pkg#linux-headers-}
  build=$(readlink -f "/lib/modules/${hver}/build" || true)
  source=$(readlink -f "/lib/modules/${hver}/source" || true)
  [[ -n ${build} && -d ${build} ]] || build=/usr/src/linux-headers-${hver}
  if [[ -z ${source} || ! -d ${source} ]]; then
    source=$(ls -d "/usr/src/linux-headers-$(headers_pkg_version "${pkg}")-common" 2>/dev/null || true)
  fi
  [[ -d ${build} ]] || die "headers package ${pkg} has no ${build}"
  mkdir -p "${KDIR}"
  ln -sfn "${build}" "${KDIR}/build"
  if [[ -n ${source} && -d ${source} ]]; then
    ln -sfn "${source}" "${KDIR}/source"
  else
    rm -f "${KDIR}/source"
  fi
  log "linked kernel headers for ${KREL} from ${pkg}: ${KDIR}/build -> ${build}, ${KDIR}/source -> ${source:-(none)}"
}

fstype_at() {
  awk -v m="$1" '$2 == m {t = $3} END {print t}' /proc/self/mounts
}

ensure_mount() {
  local fstype=$1 dev=$2 dir=$3
  [[ $(fstype_at "${dir}") == "${fstype}" ]] && return 0
  mkdir -p "${dir}" 2>/dev/null || true
  if mount -t "${fstype}" "${dev}" "${dir}"; then
    log "mounted ${fstype} at ${dir}"
  else
    warn "could not mount ${fstype} at ${dir}; eBPF features needing it will not work"
  fi
}

# ------------------------------------------------------------------- main ---

# Node.js: the HTTP tests' upstream server (tests/http_server.js) and a client. Debian's
# nodejs only when no node is on the PATH (a newer one may be installed otherwise).
command -v node >/dev/null || PACKAGES+=(nodejs)
mapfile -t MISSING < <(missing_packages "${PACKAGES[@]}")

# Kernel headers: decide whether we need a package and/or links.
HEADERS_PKG=""      # package whose dirs we link into $KDIR
HEADERS_OWN=0       # 1: the running kernel's own headers package (no links)
if ! kernel_headers_ok; then
  for p in build source; do
    if [[ -e ${KDIR}/${p} && ! -L ${KDIR}/${p} ]]; then
      die "${KDIR}/${p} exists but is not usable by bcc and is not a symlink; fix it by hand"
    fi
  done
  if [[ -n ${SETUP_HOST_HEADERS_PKG:-} ]]; then
    HEADERS_PKG=${SETUP_HOST_HEADERS_PKG}
  elif [[ $(dpkg-query -W -f='${db:Status-Abbrev}' "linux-headers-${KREL}" 2>/dev/null || true) == "ii " ]]; then
    die "linux-headers-${KREL} is installed but ${KDIR} has no usable headers"
  else
    HEADERS_PKG=$(installed_headers_pkg)
    if [[ -z ${HEADERS_PKG} ]]; then
      apt_update
      if apt-cache show "linux-headers-${KREL}" >/dev/null 2>&1; then
        HEADERS_PKG=linux-headers-${KREL}   # a stock Debian kernel: its own headers
        HEADERS_OWN=1
      else
        HEADERS_PKG=$(choose_headers_pkg) \
          || die "no linux-headers-*-${HEADERS_FLAVOUR} package found in the apt lists"
      fi
    fi
  fi
  if [[ -n $(missing_packages "${HEADERS_PKG}") ]]; then
    MISSING+=("${HEADERS_PKG}")
  fi
fi

if [[ ${#MISSING[@]} -gt 0 ]]; then
  apt_update
  log "installing ${#MISSING[@]} package(s): ${MISSING[*]}"
  install_policy_rc_d
  if ! run_apt env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        -o DPkg::Lock::Timeout=300 \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${MISSING[@]}"; then
    [[ -n ${APT_LOG} && -s ${APT_LOG} ]] && tail -n 40 "${APT_LOG}" >&2
    die "apt-get install failed${APT_LOG:+ (full log: ${APT_LOG})}"
  fi
  restore_policy_rc_d
  [[ -n ${APT_LOG} ]] && rm -f "${APT_LOG}"
fi

if [[ -n ${HEADERS_PKG} ]]; then
  if [[ ${HEADERS_OWN} -eq 0 ]]; then
    link_kernel_headers "${HEADERS_PKG}"
  fi
  kernel_headers_ok || die "kernel headers for ${KREL} still not usable by bcc (${KDIR})"
fi

ensure_mount tracefs nodev /sys/kernel/tracing
ensure_mount bpf bpf /sys/fs/bpf
