"""Multi-host initialisation from the environment.

- Cloud TPU pods: `jax.distributed.initialize()` auto-detects the slice.
- SLURM (GPU clusters): JAX's SLURM cluster detection reads `SLURM_*` variables.
- Explicit: `CLIPPY_COORDINATOR_ADDRESS` (host:port), `CLIPPY_NUM_PROCESSES`, `CLIPPY_PROCESS_ID`
  (set by `launch/gpu/*`); also used for several processes on one machine in tests.
"""

import os

import jax
from absl import logging

COORDINATOR = "CLIPPY_COORDINATOR_ADDRESS"
NUM_PROCESSES = "CLIPPY_NUM_PROCESSES"
PROCESS_ID = "CLIPPY_PROCESS_ID"


def _is_tpu_pod() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def initialize() -> None:
    """Calls `jax.distributed.initialize` when the environment describes several processes."""
    if os.environ.get(COORDINATOR):
        missing = [name for name in (NUM_PROCESSES, PROCESS_ID) if not os.environ.get(name)]
        if missing:
            raise ValueError(f"{COORDINATOR} is set but {', '.join(missing)} is not; set all three.")
        jax.distributed.initialize(
            coordinator_address=os.environ[COORDINATOR],
            num_processes=int(os.environ[NUM_PROCESSES]),
            process_id=int(os.environ[PROCESS_ID]),
        )
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or _is_tpu_pod():
        jax.distributed.initialize()
    else:
        return
    logging.info("Initialised JAX distributed: process %d of %d.", jax.process_index(), jax.process_count())
