"""Guest-side pieces of the virtio-net guest tests: the device's QEMU options
and the busybox shell steps every net guest script starts with.

Each helper returns QEMU arguments or a piece of shell for a test to join
into its guest script; none boots anything.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["add_net", "guest_ip", "line_value", "ping_until", "send_until_acked"]


def add_net(vm, sock: str | Path, mac: str, pairs: int = 1, reconnect_ms: int | None = None) -> None:
    """Give ``vm`` a virtio-net-pci on the vhost-user socket ``sock``.

    ``pairs`` > 1 turns on multiqueue; ``reconnect_ms`` lets QEMU reconnect
    to a back-end that was killed and restarted.
    """
    reconnect = f",reconnect-ms={reconnect_ms}" if reconnect_ms is not None else ""
    mq = f",mq=on,vectors={2 * pairs + 2}" if pairs > 1 else ""
    vm.add_args("-chardev", f"socket,id=n0,path={sock}{reconnect}",
                "-netdev", f"vhost-user,id=net0,chardev=n0,queues={pairs}",
                "-device", f"virtio-net-pci,netdev=net0,mac={mac}{mq}")


def guest_ip(addr: str) -> str:
    """Bring eth0 up with `addr` (busybox ip)."""
    return f"""
        ip link set lo up
        ip link set eth0 up
        ip addr add {addr}/24 dev eth0
    """


def ping_until(peer: str, confirm: bool = True) -> str:
    """Ping `peer` until it answers (60 tries; the script fails without a reply).

    With ``confirm`` three more pings follow and the guest prints
    ``ping PEER ok`` when none was lost.
    """
    check = f"\n        ping -c 3 {peer} | grep -q ' 0% packet loss' && echo \"ping {peer} ok\"" if confirm else ""
    return f"""
        ok=0
        for i in $(seq 1 60); do
            if ping -c 1 -W 1 {peer} > /dev/null 2>&1; then ok=1; break; fi
        done
        [ $ok = 1 ] || {{ echo "no ping reply from {peer}"; exit 1; }}{check}
    """


def send_until_acked(peer: str, port: int, ack_port: int, tries: int, ack_wait: int) -> str:
    """Send /tmp/d to `peer`:`port` with nc and print the peer's answer as ``ack ANSWER``.

    The answer arrives on `ack_port` (listened on first); the send is tried up to
    `tries` times a second apart (until the peer listens), the answer awaited up
    to `ack_wait` seconds.
    """
    return f"""
        mkfifo /tmp/f; exec 3<>/tmp/f
        nc -l -p {ack_port} <&3 > /tmp/ack &
        for i in $(seq 1 {tries}); do
            nc {peer} {port} < /tmp/d && break
            sleep 1
        done
        for i in $(seq 1 {ack_wait}); do
            [ -s /tmp/ack ] && break
            sleep 1
        done
        echo "ack $(cat /tmp/ack)"
    """


def line_value(result, label: str) -> list[str]:
    """The words after `label` on the first guest output line that starts with it."""
    for line in result.lines:
        if line.startswith(label + " "):
            return line.split()[1:]
    raise AssertionError(f"guest printed no {label!r} line:\n{result.output}")
