"""The SMP model of the driver: VCPU processes pinned to host CPUs, interrupts delivered
per affinity, IPIs, a late balancer, over a vhost-user backend (see machine.py)."""

from vscsi.driver.smp.machine import SmpConfig, SmpMachine, StallError

__all__ = ["SmpConfig", "SmpMachine", "StallError"]
