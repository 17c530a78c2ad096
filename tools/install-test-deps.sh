#!/usr/bin/env bash
# Installs what the test suite needs on a Debian bookworm machine:
# QEMU 10 (bookworm-backports), qemu-storage-daemon, QEMU's vhost-user-gpu,
# the tools the guest initramfs is built from, and host tools the tests use.
# The backports mirror is read from the system's own apt sources, never hard-coded.
set -euo pipefail

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

debian_mirror() {
    # First URI that serves the plain "bookworm" suite, in deb822 or one-line format.
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -e "$f" ] || continue
        awk 'BEGIN{RS=""; FS="\n"}
             /Suites:[^\n]*(^|[ \t])bookworm([ \t]|$)/ || /Suites:[^\n]* bookworm( |\n|$)/ {
               for (i=1;i<=NF;i++) if ($i ~ /^URIs:/) { sub(/^URIs:[ \t]*/, "", $i); split($i,u," "); print u[1]; exit }
             }' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -e "$f" ] || continue
        awk '$1=="deb" && $0 ~ / bookworm / { for (i=2;i<=NF;i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' "$f"
    done
}

if ! apt-cache policy 2>/dev/null | grep -q 'bookworm-backports'; then
    mirror=$(debian_mirror | head -n1)
    if [ -z "$mirror" ]; then
        echo "install-test-deps: no Debian bookworm mirror found in the apt sources" >&2
        exit 1
    fi
    echo "install-test-deps: adding bookworm-backports from $mirror"
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        "$mirror" | $SUDO tee /etc/apt/sources.list.d/vhost-user-backports.sources >/dev/null
    $SUDO apt-get update -q
elif [ ! -e /var/lib/apt/lists/lock ] || [ -z "$(ls /var/lib/apt/lists/ 2>/dev/null | grep -i backports)" ]; then
    $SUDO apt-get update -q
fi

export DEBIAN_FRONTEND=noninteractive
# ethtool goes into the guest (optional initramfs layer): ethtool -L / -S in the net multiqueue test.
$SUDO apt-get install -y -q ethtool
$SUDO apt-get install -y -q -t bookworm-backports \
    qemu-system-x86 qemu-system-gui qemu-utils
$SUDO apt-get install -y -q \
    busybox-static fio socat e2fsprogs util-linux kmod cpio zstd xz-utils \
    iproute2 tshark dpdk-dev libvirglrenderer1 libegl-mesa0 libgl1-mesa-dri libseccomp2 gcc
# GL clients for the guest (initramfs layer "gl", tests/integration/test_guest_gpu_3d.py):
# kmscube and glmark2-es2-drm, with Mesa's EGL, GBM and gallium (virtio_gpu) from backports.
$SUDO apt-get install -y -q kmscube glmark2-es2-drm
$SUDO apt-get install -y -q -t bookworm-backports \
    libgbm1 libegl-mesa0 libgl1-mesa-dri mesa-libgallium libegl1 libgles2
# The native libFuzzer harnesses (csrc/fuzz/, tools/fuzz-native.sh).
$SUDO apt-get install -y -q clang-16
# libvirt (bookworm's 9.0; it drives the QEMU 10 above through <emulator>).
# tests/integration/test_libvirt.py runs its own libvirtd in a private mount
# namespace: no libvirt-daemon-system (no system service, users or config).
$SUDO apt-get install -y -q --no-install-recommends \
    libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients

# The real-guest harness (tests/harness/) boots Debian's linux-image-amd64
# (fetched with apt-get download, never installed) with a busybox initramfs.
# Check that everything it copies into the guest or runs on the host exists.
missing=""
for tool in qemu-system-x86_64 qemu-storage-daemon busybox fio socat mke2fs e2fsck \
            debugfs blkdiscard depmod dpkg-deb ldd zstd libvirtd virsh unshare \
            kmscube glmark2-es2-drm; do
    PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null || missing="$missing $tool"
done
[ -e /usr/share/qemu/qboot.rom ] || echo "install-test-deps: note: no qboot.rom, guests boot with SeaBIOS (slower)"
if [ -n "$missing" ]; then
    echo "install-test-deps: still missing:$missing" >&2
    exit 1
fi
apt-cache show --no-all-versions linux-image-amd64 >/dev/null 2>&1 \
    || { echo "install-test-deps: apt knows no linux-image-amd64 (guest kernel)" >&2; exit 1; }

# Optional: build the guest kernel and initramfs cache now (~10 s) instead of
# in the first test session ($VHOST_USER_TEST_CACHE or ~/.cache/vhost-user-tests).
if [ "${1:-}" = "--prefetch-guest" ]; then
    repo=$(cd "$(dirname "$0")/.." && pwd)
    PYTHONPATH="$repo/tests" python3 -c '
from harness.initramfs import build_initramfs
from harness.kernel import fetch_kernel
kernel = fetch_kernel()
print("install-test-deps: guest kernel", kernel.package, kernel.version, "->", kernel.image)
print("install-test-deps: guest initramfs", build_initramfs(kernel).path)'
fi
