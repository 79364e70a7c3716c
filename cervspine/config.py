"""OmegaConf resolvers used by conf/ (registered on import by every entry point)."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf


def _in_chans(context: int, windows) -> int:
    return (2 * int(context) + 1) * len(windows)


def _seq_in_chans(context: int, windows, mask: str) -> int:
    """Channels of a vertebra-sequence slice: the 2.5D stack, plus one when a mask channel is on."""
    return _in_chans(context, windows) + int(str(mask) != "none")


def _num_meta() -> int:
    from cervspine.data.metadata import NUM_FEATURES

    return NUM_FEATURES


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
        "cs.wandb_offline": _wandb_offline,
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()
