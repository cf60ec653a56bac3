"""Prometheus exposition of a running `vscsi serve` (``--metrics HOST:PORT``; needs the
'metrics' extra, prometheus-client, which serve checks before it starts).

A custom collector reads the same shared-memory counters as the ``stats`` RPC on every
scrape (nothing is copied in between): per request queue (requests, interrupts, wake-ups,
errors, bytes), per LUN (commands, bytes read and written, errors, a latency histogram with the
device's log2 microsecond buckets) and the steering (requests per target and queue, and
the switches while busy). Each of those is a VM's own (``stats vm=N``): they carry a
``vm`` label, 0 for the first ``--socket``; a LUN's size is every VM's. prometheus-client
serves it from its own thread; the collector only reads.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from vscsi.device.stats import BUCKETS
from vscsi.metrics import bucket_bounds_us

if TYPE_CHECKING:
    from vscsi.management import Management


class ServeCollector:
    def __init__(self, management: Management) -> None:
        self.management = management

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        vms = [self.management.stats(vm) for vm in range(len(self.management.ports))]
        q_requests = CounterMetricFamily("vscsi_queue_requests", "requests served per "
                                         "request queue", labels=["vm", "queue"])
        q_interrupts = CounterMetricFamily("vscsi_queue_interrupts", "interrupts (call "
                                           "eventfd writes) per request queue",
                                           labels=["vm", "queue"])
        q_wakeups = CounterMetricFamily("vscsi_queue_wakeups", "worker wake-ups per "
                                        "request queue", labels=["vm", "queue"])
        q_errors = CounterMetricFamily("vscsi_queue_errors", "handler failures per "
                                       "request queue", labels=["vm", "queue"])
        q_read = CounterMetricFamily("vscsi_queue_read_bytes", "bytes read through each "
                                     "request queue", labels=["vm", "queue"])
        q_written = CounterMetricFamily("vscsi_queue_written_bytes", "bytes written through "
                                        "each request queue", labels=["vm", "queue"])
        for vm, stats in enumerate(vms):
            for row in stats["queues"]:
                label = [str(vm), str(row["queue"])]
                q_requests.add_metric(label, row["requests"])
                q_interrupts.add_metric(label, row["interrupts"])
                q_wakeups.add_metric(label, row["wakeups"])
                q_errors.add_metric(label, row["errors"])
                q_read.add_metric(label, row["bytes_read"])
                q_written.add_metric(label, row["bytes_written"])
        yield from (q_requests, q_interrupts, q_wakeups, q_errors, q_read, q_written)

        names = ["vm", "target", "lun"]
        commands = CounterMetricFamily("vscsi_lun_commands", "commands executed", labels=names)
        read = CounterMetricFamily("vscsi_lun_read_bytes", "bytes read", labels=names)
        written = CounterMetricFamily("vscsi_lun_written_bytes", "bytes written",
                                      labels=names)
        errors = CounterMetricFamily("vscsi_lun_errors", "commands that did not end GOOD",
                                     labels=names)
        latency = HistogramMetricFamily("vscsi_lun_latency_seconds", "execution time in the "
                                        "device", labels=names)
        for vm, stats in enumerate(vms):
            for row in stats["luns"]:
                label = [str(vm), str(row["target"]), str(row["lun"])]
                commands.add_metric(label, row["commands"])
                read.add_metric(label, row["bytes_read"])
                written.add_metric(label, row["bytes_written"])
                errors.add_metric(label, row["errors"])
                buckets, seen = [], 0
                for index in range(BUCKETS):
                    seen += row["latency_hist"][index]
                    high = bucket_bounds_us(index)[1]
                    bound = "+Inf" if high == float("inf") else repr(high / 1e6)
                    buckets.append((bound, seen))
                # The device keeps no sum of latencies: 0 (rate() of the buckets works).
                latency.add_metric(label, buckets, 0.0)
        size = GaugeMetricFamily("vscsi_lun_size_bytes", "capacity (every VM's)",
                                 labels=["target", "lun"])
        for unit in self.management.lun_list():
            size.add_metric([str(unit["target"]), str(unit["lun"])], unit["size"])
        yield from (commands, read, written, errors, size, latency)

        requests = CounterMetricFamily("vscsi_target_queue_requests", "requests per target "
                                       "and request queue", labels=["vm", "target", "queue"])
        switches = CounterMetricFamily("vscsi_target_queue_switches", "requests that arrived "
                                       "on this queue while one of the target executed on "
                                       "another", labels=["vm", "target", "queue"])
        for vm, stats in enumerate(vms):
            for row in stats["steering"]["targets"]:
                for q, (n, s) in enumerate(zip(row["requests"], row["switches"], strict=True)):
                    requests.add_metric([str(vm), str(row["target"]), str(q)], n)
                    switches.add_metric([str(vm), str(row["target"]), str(q)], s)
        yield from (requests, switches)


def serve_metrics(management: Management, host: str, port: int) -> None:
    """Start the HTTP exposition (prometheus-client's own thread)."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServeCollector(management))
    start_http_server(port, addr=host, registry=registry)
