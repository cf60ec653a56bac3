"""vscsi.sim — a discrete-event model (SimPy) of multiqueue virtio-scsi steering.

Layers, low to high: ``params`` (what things cost), ``config`` (what one run is),
``model`` (the processes), ``runner`` (one run -> a `vscsi bench`-shaped dict),
``sweep`` (many runs: processes or Dask), ``presets`` (named experiments),
``calibrate`` (fit params to bench JSON), ``report`` (tables, plots), ``command`` (CLI).
The steering policies and the balancer are the driver's own (vscsi.driver). See
README.md beside this file.
"""

from vscsi.sim.config import SimConfig
from vscsi.sim.params import SimParams
from vscsi.sim.runner import simulate
from vscsi.sim.sweep import grid, run_points

__all__ = ["SimConfig", "SimParams", "grid", "run_points", "simulate"]
