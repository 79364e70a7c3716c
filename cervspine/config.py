"""OmegaConf resolvers used by conf/ (registered on import by every entry point)."""

from __future__ import annotations

from omegaconf import OmegaConf


def _in_chans(context: int, windows) -> int:
    return (2 * int(context) + 1) * len(windows)


def _num_meta() -> int:
    from cervspine.data.metadata import NUM_FEATURES

    return NUM_FEATURES


def register_resolvers() -> None:
    for name, fn in {"cs.in_chans": _in_chans, "cs.num_meta": _num_meta}.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()
