#!/usr/bin/env bash
# Builds, once, what it takes to run this checkout's runtime on an emulated ARM64 CPU (issue 30):
#   SYSROOT  Debian 12's arm64 python3.11 and the C libraries it and the wheels load, unpacked with
#            `dpkg -x` (nothing is installed: the system's dpkg and its architectures are untouched;
#            apt runs with a private state folder in the cache, so neither root nor
#            `dpkg --add-architecture` is needed to fetch them)
#   WHEELS   the aarch64 wheels (cp311, manylinux) of what `edge-runtime model verify` and
#            `edge-runtime process` import, unzipped into one folder for PYTHONPATH, at the versions
#            installed in the checkout's .venv (so that x86 and ARM run the same engines)
#   CPUINFO_DIR/<qemu cpu>  an ARM /proc/cpuinfo per emulated CPU (neoverse-n1, cortex-a72), to
#            bind-mount over the host's: QEMU 7.2 user mode shows the guest the host's x86 text, and
#            the cpuinfo library in ONNX Runtime and LiteRT dies with SIGSEGV at import on it
#   PYTHON   SYSROOT/usr/bin/python3.11-emulated: starts qemu-aarch64 (Debian's qemu-user) on the arm64
#            python3.11, with -cpu $ARM64_QEMU_CPU (default neoverse-n1); it is also the guest's
#            sys.executable, so Python processes that the runtime starts are emulated too
# Run it as benchmarks/arm64.py does, as root:
#   ARM64_QEMU_CPU=neoverse-n1 PYTHONPATH=WHEELS:REPO \
#     unshare -m sh -c 'mount --bind "$0" /proc/cpuinfo && exec "$@"' CPUINFO_DIR/neoverse-n1 PYTHON ...
#
# Cache: $ARM64_CACHE, default $HOME/.cache/healthdiag-arm64. A stamp (the package lists and the wheel
# pins) makes a second run a no-op; a change of pins (a new onnxruntime in .venv) rebuilds.
# Prints SYSROOT=, WHEELS=, CPUINFO_DIR=, PYTHON= lines and exits 0; exits 3 with the reason on stderr
# when the pieces cannot be had here (not x86-64 Linux, no apt-get/dpkg, no network to Debian or PyPI).
set -euo pipefail

REPO="$(cd "$(dirname "$0")/../.." && pwd)"
CACHE="${ARM64_CACHE:-${HOME:-/root}/.cache/healthdiag-arm64}"
MIRROR="${ARM64_DEBIAN_MIRROR:-http://deb.debian.org}"

die() {
  echo "arm64 sysroot: $*" >&2
  exit 3
}

# Debian 12 arm64 packages: the interpreter, its standard library and the shared libraries that the
# interpreter, its extension modules and the wheels' own binaries (manylinux: only glibc, libstdc++,
# libgcc_s, libgomp and zlib outside the wheel) link against.
DEBS=(
  python3.11-minimal libpython3.11-minimal libpython3.11-stdlib
  libc6 libgcc-s1 libstdc++6 libgomp1 zlib1g libexpat1 libffi8 libssl3 libbz2-1.0 liblzma5
  libuuid1 libsqlite3-0 libcrypt1
)

# Distributions (as .venv names them) that `model verify` and `process` import, found by running both
# under emulation: the engines, the decoder, the settings and the manifest signature check.
WHEEL_DISTS=(
  numpy onnxruntime ai-edge-litert opencv-python-headless pydicom
  pydantic pydantic-core annotated-types typing-extensions typing-inspection
  PyYAML cryptography cffi pycparser flatbuffers packaging protobuf
)

case "$(uname -s)/$(uname -m)" in
  Linux/x86_64) ;;
  *) die "needs an x86-64 Linux host (this is $(uname -s)/$(uname -m))" ;;
esac
for tool in apt-get dpkg-deb python3; do
  command -v "$tool" >/dev/null || die "needs $tool (a Debian host)"
done
[ -r /usr/share/keyrings/debian-archive-keyring.gpg ] || die "needs debian-archive-keyring (apt-get install debian-archive-keyring)"

# The wheel pins: .venv's versions where it has the distribution, so that both sides run one release.
VENV_PY="$REPO/.venv/bin/python"
[ -x "$VENV_PY" ] || VENV_PY=python3
pins="$("$VENV_PY" - "${WHEEL_DISTS[@]}" <<'EOF'
import sys
from importlib import metadata
for name in sys.argv[1:]:
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(name)
EOF
)"

SYSROOT="$CACHE/sysroot"
WHEELS="$CACHE/wheels"
CPUINFO_DIR="$CACHE/cpuinfo"
STAMP="$CACHE/stamp"
key="$(printf '%s\n' "v3 $(getconf _NPROCESSORS_CONF 2>/dev/null)" "${DEBS[@]}" "$pins" | sha256sum | cut -c1-16)"

report() {
  echo "SYSROOT=$SYSROOT"
  echo "WHEELS=$WHEELS"
  echo "CPUINFO_DIR=$CPUINFO_DIR"
  echo "PYTHON=$SYSROOT/usr/bin/python3.11-emulated"
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$key" ] && [ -x "$SYSROOT/usr/bin/python3.11-emulated" ] \
  && [ -f "$CPUINFO_DIR/neoverse-n1" ]; then
  report
  exit 0
fi
start=$SECONDS
mkdir -p "$CACHE"
rm -f "$STAMP"

# -- (a) the sysroot: apt with its own state, sources and cache, all under $CACHE/apt ---------------
APT="$CACHE/apt"
mkdir -p "$APT/lists/partial" "$APT/archives/partial" "$APT/debs" "$APT/etc/parts"
: >"$APT/status"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
cat >"$APT/etc/sources.list" <<EOF
deb [arch=arm64 signed-by=$keyring] $MIRROR/debian bookworm main
deb [arch=arm64 signed-by=$keyring] $MIRROR/debian bookworm-updates main
deb [arch=arm64 signed-by=$keyring] $MIRROR/debian-security bookworm-security main
EOF
apt_opts=(
  -o "Dir::State=$APT" -o "Dir::State::Lists=$APT/lists" -o "Dir::State::status=$APT/status"
  -o "Dir::Cache=$APT" -o "Dir::Cache::Archives=$APT/archives"
  -o "Dir::Etc::SourceList=$APT/etc/sources.list" -o "Dir::Etc::SourceParts=$APT/etc/parts"
  -o "APT::Architecture=arm64" -o "APT::Architectures::=arm64" -o "Acquire::Languages=none"
  -o "Acquire::Retries=3"
)
# apt fetches as this user (not _apt, which cannot write into a cache under $HOME), into folders it owns.
apt_opts+=(-o "APT::Sandbox::User=$(id -un)")
echo "arm64 sysroot: apt-get update (arm64 lists, private state in $APT)" >&2
apt-get "${apt_opts[@]}" -qq --error-on=any update >&2 \
  || die "apt-get update for arm64 failed (no network to $MIRROR?)"
echo "arm64 sysroot: apt-get download ${#DEBS[@]} arm64 packages" >&2
(cd "$APT/debs" && rm -f ./*.deb && apt-get "${apt_opts[@]}" -qq download "${DEBS[@]/%/:arm64}" >&2) \
  || die "apt-get download of the arm64 packages failed"
rm -rf "$SYSROOT.new"
mkdir -p "$SYSROOT.new"
for deb in "$APT/debs"/*.deb; do
  dpkg-deb -x "$deb" "$SYSROOT.new"
done
[ -x "$SYSROOT.new/usr/bin/python3.11" ] || die "python3.11 is missing from the unpacked packages"
# The interpreter as the guest sees itself (sys.executable): a host shell script that starts QEMU on
# the arm64 python3.11 again. A guest process that starts Python (the decoder sandbox's forkserver,
# subprocess) execs this; without it the host kernel is handed an aarch64 ELF (no binfmt_misc here).
# The CPU model comes from ARM64_QEMU_CPU, which every process of one run inherits.
cat >"$SYSROOT.new/usr/bin/python3.11-emulated" <<'EOF'
#!/bin/sh
root="$(cd "$(dirname "$0")/../.." && pwd)"
exec qemu-aarch64 -cpu "${ARM64_QEMU_CPU:-neoverse-n1}" -L "$root" -0 "$0" "$root/usr/bin/python3.11" "$@"
EOF
chmod +x "$SYSROOT.new/usr/bin/python3.11-emulated"
rm -rf "$SYSROOT"
mv "$SYSROOT.new" "$SYSROOT"

# -- (b) the wheels ---------------------------------------------------------------------------------
mkdir -p "$CACHE/wheel-files"
mapfile -t pin_list <<<"$pins"
echo "arm64 sysroot: pip download (aarch64, cp311): ${pin_list[*]}" >&2
# --no-deps: the list above is the whole set (what the two commands import), not the packages'
# declared closure (onnxruntime's sympy, ai-edge-litert's tqdm are never imported by them).
"$VENV_PY" -m pip download -q --no-deps --only-binary=:all: --dest "$CACHE/wheel-files" \
  --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 \
  --platform manylinux_2_27_aarch64 --platform manylinux_2_26_aarch64 --platform manylinux_2_24_aarch64 \
  --platform linux_aarch64 \
  --python-version 3.11 --implementation cp --abi cp311 "${pin_list[@]}" >&2 \
  || die "pip download of the aarch64 wheels failed (no network to PyPI, or no aarch64 wheel for a pin)"
rm -rf "$WHEELS.new"
mkdir -p "$WHEELS.new"
"$VENV_PY" - "$WHEELS.new" "${pin_list[@]}" <<'EOF' >&2
# Unzip the wheel of each pin (the folder may hold older versions from an earlier build).
import re
import sys
import zipfile
from pathlib import Path

dest, pins = Path(sys.argv[1]), sys.argv[2:]
files = sorted(Path(dest.parent / "wheel-files").glob("*.whl"))
norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()  # noqa: E731
for pin in pins:
    name, _, version = pin.partition("==")
    found = [f for f in files if norm(f.name.split("-")[0]) == norm(name)
             and (not version or f.name.split("-")[1] == version)]
    if not found:
        sys.exit(f"no wheel for {pin} in {dest.parent / 'wheel-files'}")
    with zipfile.ZipFile(found[-1]) as wheel:
        wheel.extractall(dest)
    print(f"arm64 sysroot: unzipped {found[-1].name}")
EOF
rm -rf "$WHEELS"
mv "$WHEELS.new" "$WHEELS"

# -- (c) ARM /proc/cpuinfo texts, one per QEMU CPU model, as Linux 6.1 writes them: a Neoverse-N1 core
# (AWS Graviton2; dot product) and a Cortex-A72 (Raspberry Pi 4; none). One processor entry per host
# CPU, as QEMU shows the guest the host's /sys/devices/system/cpu.
cpus="$(getconf _NPROCESSORS_CONF 2>/dev/null || echo 1)"
write_cpuinfo() { # FILE FEATURES VARIANT PART REVISION BOGOMIPS [TRAILER]
  local n
  for ((n = 0; n < cpus; n++)); do
    printf 'processor\t: %d\nBogoMIPS\t: %s\nFeatures\t: %s\nCPU implementer\t: 0x41\n' "$n" "$6" "$2"
    printf 'CPU architecture: 8\nCPU variant\t: %s\nCPU part\t: %s\nCPU revision\t: %s\n\n' "$3" "$4" "$5"
  done >"$1"
  [ -z "${7:-}" ] || printf '%s\n' "$7" >>"$1"
}
rm -rf "$CPUINFO_DIR"
mkdir -p "$CPUINFO_DIR"
write_cpuinfo "$CPUINFO_DIR/neoverse-n1" \
  "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs" \
  0x3 0xd0c 1 243.75
write_cpuinfo "$CPUINFO_DIR/cortex-a72" "fp asimd evtstrm crc32 cpuid" 0x0 0xd08 3 108.00 \
  "$(printf 'Hardware\t: BCM2835\nRevision\t: c03111\nModel\t\t: Raspberry Pi 4 Model B Rev 1.1')"

echo "$key" >"$STAMP"
echo "arm64 sysroot: built in $((SECONDS - start)) s under $CACHE" >&2
report
