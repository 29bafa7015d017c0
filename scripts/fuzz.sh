#!/usr/bin/env bash
# Fuzzes every cargo-fuzz target for SECONDS each (default 30), starting from its committed
# corpus. New inputs go to a scratch directory, not the repository; a crash fails the run and
# leaves its input under <crate>/fuzz/artifacts/<target>/ (replay it with `cargo +nightly fuzz
# run <target> <file>`). Needs the nightly toolchain (libFuzzer's instrumentation) and
# cargo-fuzz, which it installs when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-30}"

if ! rustup toolchain list | grep -q '^nightly'; then
    echo "error: fuzzing needs the nightly toolchain (rustup toolchain install nightly)" >&2
    exit 1
fi
if ! command -v cargo-fuzz >/dev/null; then
    cargo install cargo-fuzz --locked
fi

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
for crate_target in devices:blk_descriptor_chain devices:virtio_blk devices:virtio_net devices:virtio_vsock \
    vmm:http_request vmm:vm_config; do
    crate="${crate_target%%:*}"
    target="${crate_target##*:}"
    mkdir -p "$scratch/$target"
    echo "fuzz: $crate/$target for ${seconds}s"
    status=0
    (cd "$crate" && cargo +nightly fuzz run "$target" "$scratch/$target" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1) \
        >"$scratch/$target.log" 2>&1 || status=$?
    grep -E '^stat::(number_of_executed_units|new_units_added)' "$scratch/$target.log" || true
    if [ "$status" -ne 0 ]; then
        tail -40 "$scratch/$target.log" >&2
        echo "error: fuzz target $target failed (status $status); its input is under $crate/fuzz/artifacts/$target/" >&2
        exit 1
    fi
done
