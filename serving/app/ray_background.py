"""How often Ray Serve's controller runs its loop under `vtfuse serve`, the benchmarks and the tests.

With no request at all, a stack on 2 cores (Triton, HAProxy, two Ingress replicas, Ray) used ~0.19 s
of CPU per second, ~10 % of the machine, taken from the engines when it is under load. The largest
single part was Serve's controller, whose loop runs every 0.1 s (`RAY_SERVE_CONTROL_LOOP_INTERVAL_S`)
and polls the GCS each time: 44 ms/s, and 22 ms/s more in the GCS. At 0.5 s the stack idles at
~0.14 s/s (controller 17, GCS 9). Other timers measured then changed nothing measurable (replica
metrics export, raylet resource reports, the dashboard agent's reporter, task events):
`python -m loadtests.front_cpu --idle` and loadtests/README.md, lever 38.

The cost: the controller reacts up to 0.4 s later (a replica replaced, HAProxy's routes updated, a
drain's configuration applied), which the stop and reliability tests allow for. A value in the
environment wins, and `RAY_SERVE_CONTROL_LOOP_INTERVAL_S=0.1` brings Ray's default back.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

CONTROL_LOOP_INTERVAL_S = 0.5
SETTINGS = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": f"{CONTROL_LOOP_INTERVAL_S:g}"}


def background_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """SETTINGS for Ray's processes to inherit, each unless `env` (default: ours) sets it already."""
    env = os.environ if env is None else env
    return {k: env.get(k) or v for k, v in SETTINGS.items()}
