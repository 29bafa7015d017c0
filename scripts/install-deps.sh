#!/usr/bin/env bash
# Installs the host tools that the tests, the demo's swaps and the benchmarks drive:
#   iasl                (acpica-tools)    decodes our ACPI tables
#   qemu-system-x86_64  (qemu-system-x86) the peer VMM the microguest's drivers are checked on
#   qemu-nbd, qemu-img  (qemu-utils)      a real NBD server
#   wrk, curl           (wrk, curl)       HTTP clients driving the swarm's front end
#   st                  (schemathesis, PyPI, in a venv at /opt/vmm-test-tools)
#                                         generates API requests from our OpenAPI document
# Installs only what is missing, never downgrades, and touches nothing when all are present.
#
# Every QEMU package must come from one Debian suite: qemu-utils 10 (bookworm-backports, as this
# project's machine image ships it) declares that it breaks bookworm's qemu-system-common 7.2, so
# a plain `apt-get install qemu-system-x86` is refused there. On bookworm the QEMU packages are
# therefore taken from bookworm-backports, enabled through a source file of our own under
# /etc/apt/sources.list.d (the distribution's own sources file is never edited).
#
# Usage: scripts/install-deps.sh          (as root, or with sudo available)
set -euo pipefail

say() { echo "install-deps: $*" >&2; }

# Schemathesis, pinned: the API conformance test (tests/api_conformance.rs) reads its output.
SCHEMATHESIS_VERSION=4.32.5
TOOLS_VENV=/opt/vmm-test-tools
install_schemathesis() {
    if [ -x "$TOOLS_VENV/bin/st" ] && "$TOOLS_VENV/bin/st" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
        return
    fi
    command -v python3 >/dev/null || { say "python3 is missing: it runs Schemathesis"; exit 1; }
    say "installing schemathesis $SCHEMATHESIS_VERSION into $TOOLS_VENV"
    python3 -m venv "$TOOLS_VENV"
    "$TOOLS_VENV/bin/pip" install -q --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
    "$TOOLS_VENV/bin/st" --version >&2
}

need=()
command -v iasl >/dev/null || need+=(acpica-tools)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
{ command -v qemu-nbd >/dev/null && command -v qemu-img >/dev/null; } || need+=(qemu-utils)
command -v wrk >/dev/null || need+=(wrk)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -eq 0 ]; then
    install_schemathesis
    exit 0
fi

as_root=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null; then
        as_root=(sudo)
    else
        say "missing ${need[*]}, and installing them needs root (run this as root or install sudo)"
        exit 1
    fi
fi
if ! command -v apt-get >/dev/null; then
    say "missing ${need[*]}; this script knows only Debian's apt-get: install the equivalents by hand"
    exit 1
fi

codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")
target=()
if [ "$codename" = bookworm ]; then
    backports=bookworm-backports
    # Only lines that are not comments count (a commented-out suite is not enabled).
    if ! grep -rqsE --include='*.list' --include='*.sources' -e "^[^#]*$backports" /etc/apt/sources.list /etc/apt/sources.list.d; then
        source_file=/etc/apt/sources.list.d/vmm-$backports.sources
        say "enabling $backports for QEMU 10 ($source_file)"
        "${as_root[@]}" tee "$source_file" >/dev/null <<EOF
# Added by vmm's scripts/install-deps.sh: QEMU 10 (matching the image's qemu-utils) comes from here.
Types: deb
URIs: http://deb.debian.org/debian
Suites: $backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
        "${as_root[@]}" apt-get update -q >/dev/null
    fi
    # -t prefers backports where it has the package (QEMU) and falls back to bookworm otherwise.
    target=(-t "$backports")
fi

install() {
    # No --allow-downgrades: apt refuses, rather than performs, any downgrade this would need.
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${target[@]}" "${need[@]}" >/dev/null
}
say "installing ${need[*]}${target[*]:+ (${target[*]})}"
if ! install; then
    say "retrying after apt-get update"
    "${as_root[@]}" apt-get update -q >/dev/null
    install
fi
for tool in iasl qemu-system-x86_64 qemu-nbd qemu-img; do
    command -v "$tool" >/dev/null || { say "$tool is still missing after the install"; exit 1; }
done
say "$(qemu-system-x86_64 --version | head -1); $(qemu-nbd --version | head -1)"
install_schemathesis
