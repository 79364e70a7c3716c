"""DDP under Hydra without stray run folders or nested sweeps.

Lightning starts DDP ranks > 0 by re-running the command line with ``hydra.run.dir=<run.dir>``. Inside a
multirun that is wrong twice: ``run.dir`` is not the job's folder (a new timestamped folder appears per
rank) and the command line still holds ``-m`` and the sweep, so every child starts a sweep of its own.
``patch_lightning_hydra_ddp`` makes the children re-run exactly this job: its resolved overrides, in
its own output folder, never as a multirun.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def _job_subprocess_cmd(local_rank: int) -> tuple[Sequence[str], str]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd, to_absolute_path

    import __main__

    hc = HydraConfig.get()
    if __main__.__spec__ is None:
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    command += [f"--config-name={hc.job.config_name}"]
    for src in hc.runtime.config_sources:
        if src.provider == "command-line":
            command += [f"--config-dir={src.path}"]
    command += list(hc.overrides.task)
    out = hc.runtime.output_dir
    command += [
        f'hydra.run.dir="{out}"',
        f"hydra.job.name={hc.job.name}_ddp_rank{local_rank}",
        "hydra.output_subdir=null",
        "hydra/hydra_logging=none",
        "hydra/job_logging=none",
    ]
    return command, get_original_cwd()


def patch_lightning_hydra_ddp() -> None:
    """Route Lightning's DDP child command through :func:`_job_subprocess_cmd` (idempotent)."""
    import lightning.fabric.strategies.launchers.subprocess_script as fabric_launcher
    import lightning.pytorch.strategies.launchers.subprocess_script as pl_launcher

    fabric_launcher._hydra_subprocess_cmd = _job_subprocess_cmd
    pl_launcher._hydra_subprocess_cmd = _job_subprocess_cmd
