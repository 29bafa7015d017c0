#!/bin/bash
# Runs the microguest's virtio programs against QEMU's virtio-mmio devices (microvm, KVM):
# blk-rw (read-write and read-only), blk-bench, blk-stress (its digest checked against the
# image), net-echo and net-stream (clean and with injected faults) and vsock-echo (through vhost_user_vsock_echo.py). Needs qemu-system-x86_64, /dev/kvm and
# python3; build the guest first (cargo build --release in guest-agent/microguest).
# Prints each guest's last lines and PASS/FAIL per case; exits non-zero if any case failed.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
IMAGE=${IMAGE:-$HERE/../target/release/microguest}
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$WORK"' EXIT
# QEMU tells the guest its TSC frequency only with these CPU options (IOPS and rates need it).
CPU=${QEMU_CPU:-host,-arch-capabilities,+invtsc,vmware-cpuid-freq=on}
failures=0

qemu() { # qemu EXPECTED_GUEST_STATUS "APPEND" EXTRA_ARGS...
    local want=$1 append=$2; shift 2
    local out
    out=$(timeout 120 qemu-system-x86_64 -M microvm,acpi=off${MEMBACKEND:-} -enable-kvm -cpu "$CPU" \
        -m 256 ${MEMOBJ:-} -no-user-config -nodefaults -nographic -serial stdio \
        -device isa-debug-exit,iobase=0xf4,iosize=4 -global virtio-mmio.force-legacy=false \
        -kernel "$IMAGE" "$@" -append "$append" 2>&1)
    local rc=$? expect=$(( (want << 1) | 1 ))
    echo "$out" > "$WORK/last.log"
    echo "$out" | grep -v 'CPUID.01H' | tail -4 | sed 's/^/    /'
    if [ $rc -eq $expect ]; then echo "PASS: $append"; else echo "FAIL (qemu rc $rc, want $expect): $append"; failures=$((failures + 1)); fi
}

disk() { echo "-drive file=$1,format=raw,if=none,id=d$2${3:-} -device virtio-blk-device,drive=d$2,serial=microguest-disk$2"; }
NET="-netdev socket,id=n0,udp=127.0.0.1:5555,localaddr=127.0.0.1:5556 -device virtio-net-device,netdev=n0,mac=52:54:00:12:34:56"

truncate -s 64M "$WORK/disk.img"
qemu 0 "prog=blk-rw" $(disk "$WORK/disk.img" 0)
qemu 0 "prog=blk-rw expect_pattern=1" $(disk "$WORK/disk.img" 0 ,readonly=on)
qemu 0 "prog=blk-bench mode=randread qd=1" $(disk "$WORK/disk.img" 0)
qemu 0 "prog=blk-bench mode=randwrite qd=16 ops=20000" $(disk "$WORK/disk.img" 0)
qemu 1 "prog=blk-rw" -global virtio-mmio.force-legacy=true $(disk "$WORK/disk.img" 0)
qemu 0 "prog=blk-stress ops=50000 qd=16 seed=0x5eed" $(disk "$WORK/disk.img" 0)
want=$(grep -o 'digest=[0-9a-f]*' "$WORK/last.log")
got=$(python3 "$HERE/blk_stress_image.py" "$WORK/disk.img" 0x5eed 16384 | grep -o 'digest=[0-9a-f]*')
if [ -n "$want" ] && [ "$want" = "$got" ]; then echo "PASS: blk-stress image $got"; else echo "FAIL: blk-stress image $got, guest $want"; failures=$((failures + 1)); fi

python3 "$HERE/udp_echo.py" & ECHO=$!; sleep 0.3
qemu 0 "prog=net-echo" $NET
qemu 0 "prog=net-echo frames=20000 size=1514 window=32" $NET
qemu 0 "prog=net-stream frames=50000" $NET
qemu 0 "prog=net-echo frames=2000 size=9014" -netdev socket,id=n0,udp=127.0.0.1:5555,localaddr=127.0.0.1:5556 -device virtio-net-device,netdev=n0,host_mtu=9000,mrg_rxbuf=off
kill $ECHO; wait $ECHO 2>/dev/null
for fault in drop dup corrupt; do
    python3 "$HERE/udp_echo.py" --every 100 --fault $fault & ECHO=$!; sleep 0.3
    qemu 1 "prog=net-echo frames=300 timeout_ms=200" $NET
    # net-stream reports lost frames without failing, unless max_lost says otherwise.
    qemu $([ $fault = drop ] && echo 0 || echo 1) "prog=net-stream frames=3000 timeout_ms=200" $NET
    [ $fault = drop ] && qemu 1 "prog=net-stream frames=3000 timeout_ms=200 max_lost=10" $NET
    kill $ECHO; wait $ECHO 2>/dev/null
done

vsock() { # vsock EXPECTED "APPEND" BACKEND_ARGS...
    local want=$1 append=$2; shift 2
    local sock=$WORK/vhu.sock
    rm -f "$sock"
    python3 "$HERE/vhost_user_vsock_echo.py" "$sock" "$@" 2>"$WORK/backend.log" & local backend=$!
    for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done
    MEMBACKEND=",memory-backend=mem" MEMOBJ="-object memory-backend-memfd,id=mem,size=256M,share=on" \
        qemu "$want" "$append" -chardev socket,id=c0,path="$sock" -device vhost-user-vsock-device,chardev=c0
    sleep 0.3; kill $backend 2>/dev/null; wait $backend 2>/dev/null
    if grep -q VIOLATION "$WORK/backend.log"; then
        grep VIOLATION "$WORK/backend.log" | head -5; echo "FAIL: backend saw protocol violations"; failures=$((failures + 1))
    fi
}
vsock 0 "prog=vsock-echo"
vsock 0 "prog=vsock-echo bytes=4194304 chunk=65536" --buf-alloc 4194304 --chunk 4096
vsock 0 "prog=vsock-echo bytes=1000000 chunk=65536" --buf-alloc 8192 --chunk 1000
vsock 0 "prog=vsock-echo" --buf-alloc 8192 --hold 32768 --delay-credit
vsock 1 "prog=vsock-echo port=999"
vsock 1 "prog=vsock-echo timeout_ms=1000" --no-rst

echo "$failures failure(s)"
[ $failures -eq 0 ]
