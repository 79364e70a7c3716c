"""OmegaConf resolvers used by conf/ (registered on import by every entry point), and composing an entry
point's config outside its command line (tests, benchmarks, notebooks)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def _in_chans(context: int, windows) -> int:
    return (2 * int(context) + 1) * len(windows)


def _seq_in_chans(context: int, windows, mask: str) -> int:
    """Channels of a vertebra-sequence slice: the 2.5D stack, plus one when a mask channel is on."""
    return _in_chans(context, windows) + int(str(mask) != "none")


def _num_meta() -> int:
    from cervspine.data.metadata import NUM_FEATURES

    return NUM_FEATURES


def _cpu_precision() -> str:
    """Trainer precision for CPU runs: bf16-mixed where the CPU has native bf16 instructions (AVX512-BF16
    or AMX: ~1.45× faster ResNet training steps measured here), else 32-true (emulated bf16 is slower)."""
    import torch

    native = any(
        getattr(torch.cpu, name, lambda: False)()
        for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )
    return "bf16-mixed" if native else "32-true"


def _conf_dir(sub: str = "") -> str:
    """An absolute path inside conf/ (``hydra.searchpath`` resolves relative paths from the cwd)."""
    return str(CONF_DIR / sub)


def _cache_dir(root: str, image_size: int | None) -> str:
    from cervspine.cache.params import default_cache_dir

    return str(default_cache_dir(root, image_size))


def _wandb_offline() -> bool:
    """Offline unless the user has a W&B login (API key in the environment or ~/.netrc) or forces online."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        return True
    if mode == "online" or os.environ.get("WANDB_API_KEY"):
        return False
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" not in netrc.read_text()
    except OSError:
        return True


def register_resolvers() -> None:
    resolvers = {
        "cs.in_chans": _in_chans,
        "cs.seq_in_chans": _seq_in_chans,
        "cs.num_meta": _num_meta,
        "cs.cpu_precision": _cpu_precision,
        "cs.cache_dir": _cache_dir,
        "cs.conf_dir": _conf_dir,
        "cs.wandb_offline": _wandb_offline,
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


@contextlib.contextmanager
def composed(config_name: str, overrides: list[str], output_dir: Path) -> Iterator[DictConfig]:
    """Compose ``conf/<config_name>.yaml`` as the entry point would, with its run dir at ``output_dir``
    (what the entry points' ``train(cfg)``/``run(cfg)`` functions take)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(output_dir)
            cfg.hydra.job.num = 0
        HydraConfig().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
            cfg.paths.log_dir = str(output_dir / "logs")
            del cfg["hydra"]
        yield cfg
    GlobalHydra.instance().clear()
