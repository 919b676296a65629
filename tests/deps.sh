#!/bin/bash
# Install everything the suite needs on Debian 12/13 (or Ubuntu): the
# runtime deps as distro packages, a libvirt >= 10.4 (bookworm-backports on
# Debian 12), and the tools the packaging tests use. Idempotent and quiet
# when everything is already there.
set -euo pipefail

[ "$(id -u)" = 0 ] || { echo "tests/deps.sh: run as root" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive

. /etc/os-release
CODENAME="${VERSION_CODENAME:-}"

BASE=(iptables nftables python3-nftables python3-lxml python3-yaml python3-iptables python3-systemd
      busybox iproute2 procps dnsmasq-base qemu-system-x86 kmod python3-scapy python3-jeepney)
# `--runtime`: just enough for ./try-it; otherwise also the test and packaging tools.
if [ "${1:-}" != "--runtime" ]; then
    BASE+=(python3-pytest python3-hypothesis python3-venv python3-pip
           dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools
           lintian rpm systemd fakeroot bash-completion libsystemd-dev pkg-config gcc python3-dev groff man-db
           dbus-daemon firewalld docker.io ufw debootstrap)
    # firewalld, docker.io and ufw are for the e2e sandboxes only
    # (test_firewalld.py, test_other_managers.py run them inside a sandbox's
    # namespaces): none of them may start on this host (see below).
    # debootstrap builds the Debian 12 root with its stock libvirt 9.0 that
    # the e2e matrix runs (tests/e2e/libvirt_root.py), cached in /var/tmp.
fi
# The real guest of tests/e2e/test_real_guest.py (a Debian kernel and a
# busybox initramfs) is not installed here: tests/e2e/guest_image.py fetches
# linux-image-amd64's kernel image, busybox-static, netcat-traditional and
# libc6 with `apt-get download` at test time (busybox-static conflicts with
# the busybox the sandbox uses, and the host's /boot stays as it is) and
# caches the result in /var/tmp/vnethook-e2e-guest. Only apt and dpkg-deb.
LIBVIRT=(libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu libvirt-daemon-driver-network)

missing=()
for p in "${BASE[@]}" "${LIBVIRT[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
lv_ok=1
if command -v libvirtd >/dev/null; then
    v=$(libvirtd --version | grep -oE '[0-9]+\.[0-9]+' | head -1)
    [ "$(printf '%s\n' 10.4 "$v" | sort -V | head -1)" = 10.4 ] || lv_ok=0
else
    lv_ok=0
fi
if [ ${#missing[@]} -eq 0 ] && [ $lv_ok = 1 ]; then
    exit 0
fi

echo "tests/deps.sh: installing: ${missing[*]:-} (libvirt >= 10.4: $([ $lv_ok = 1 ] && echo present || echo needed))"
apt_opts=(-y -q --no-install-recommends -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
lv_pkgs=("${LIBVIRT[@]}")
if [ "$CODENAME" = bookworm ]; then
    # Debian 12 ships libvirt 9.0 (iptables backend only); backports has 11.x.
    if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
        # The archive this machine already uses (its own mirror), never a
        # host name of ours: the URI of the source that serves "bookworm".
        mirror=$(tests/tools/apt-mirror bookworm) || {
            echo "tests/deps.sh: no apt source serves bookworm; add bookworm-backports by hand" >&2; exit 1; }
        printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
            "$mirror" > /etc/apt/sources.list.d/vnethook-tests-backports.sources
    fi
    # Name every libvirt package with /bookworm-backports (not -t, which
    # would also upgrade systemd and udev).
    lv_pkgs=()
    for p in libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu libvirt-daemon-driver-network \
             libvirt-daemon-config-network libvirt-daemon-config-nwfilter libvirt-daemon libvirt0 \
             libvirt-daemon-common libvirt-daemon-lock libvirt-daemon-log libvirt-daemon-driver-nwfilter \
             libvirt-daemon-system-systemd libvirt-common libvirt-l10n libvirt-daemon-plugin-lockd \
             libvirt-daemon-driver-nodedev libvirt-daemon-driver-secret libvirt-daemon-driver-storage \
             libvirt-daemon-driver-interface libvirt-daemon-plugin-sanlock libvirt-clients-qemu; do
        lv_pkgs+=("$p/bookworm-backports")
    done
fi
apt-get update -q >/dev/null
# firewalld (tests/e2e/test_firewalld.py runs its own, on a private D-Bus)
# and dockerd (test_other_managers.py) must not start on this host, nor at
# its next boot: docker.io's postinst starts dockerd through invoke-rc.d
# where there is no systemd (containers, this CI), which would change the
# host's iptables. A policy-rc.d that refuses every start covers the
# install (both invoke-rc.d and deb-systemd-invoke ask it); a fresh install
# is disabled.
fresh=()
for p in firewalld docker.io; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || fresh+=("$p")
done
own_policy=0
if [ ${#fresh[@]} -gt 0 ] && [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\n# tests/deps.sh: start nothing while installing\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    own_policy=1
fi
rc=0
apt-get install "${apt_opts[@]}" "${BASE[@]}" "${lv_pkgs[@]}" >/dev/null || rc=$?
if [ $own_policy = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
[ $rc = 0 ] || exit $rc
if command -v deb-systemd-helper >/dev/null; then
    for p in "${fresh[@]}"; do
        case $p in
            firewalld) units=(firewalld.service) ;;
            docker.io) units=(docker.service docker.socket containerd.service) ;;
        esac
        for u in "${units[@]}"; do
            deb-systemd-helper disable "$u" >/dev/null 2>&1 || true
        done
    done
fi
for d in firewalld dockerd; do
    if pgrep -x "$d" >/dev/null; then
        echo "tests/deps.sh: warning: a $d runs on this host (not started by the tests)" >&2
    fi
done
# The packages' postinst may have started nothing (no systemd), but be sure
# no host libvirtd from the package interferes with the sandboxes.
exit 0
