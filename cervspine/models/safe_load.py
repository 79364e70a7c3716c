"""Reading checkpoints without running code from them: ``torch.load(weights_only=True)`` everywhere, with
exactly the classes our checkpoints hold allowed (``torch.serialization.add_safe_globals``): the plain
types, OmegaConf containers and nodes of the hyper-parameters, the optimizer/backbone/scheduler partials
Hydra records (``_partial_: true``) and the classes they name. A checkpoint that refers to anything else
— a pickle that would import and call arbitrary code — is refused with the name of what it wanted.
Importing this module registers the list (Lightning's own loads of our checkpoints need it too)."""

from __future__ import annotations

import collections
import functools
import inspect
import pathlib
import pickle
import re
import typing
from pathlib import Path
from typing import Any

import torch


def checkpoint_globals() -> list[Any]:
    """Everything a cervspine checkpoint may refer to by name."""
    import omegaconf
    from hydra._internal import target_policy
    from omegaconf import base, nodes

    from cervspine.models import backbones, optim

    out: list[Any] = [dict, list, tuple, set, int, float, str, bool, typing.Any]
    out += [collections.defaultdict, collections.OrderedDict, functools.partial, pathlib.PosixPath]
    out += [omegaconf.DictConfig, omegaconf.ListConfig, base.ContainerMetadata, base.Metadata]
    out += [c for n, c in vars(nodes).items() if n.endswith("Node") and inspect.isclass(c)]
    deferred = getattr(target_policy, "_DeferredTarget", None)  # Hydra's partials (1.3.8+)
    out += [deferred] if deferred is not None else []
    opt = torch.optim
    out += [c for c in vars(opt).values() if inspect.isclass(c) and issubclass(c, opt.Optimizer)]
    out += [backbones.create_backbone, optim.warmup_cosine]
    try:
        from timm.scheduler import create_scheduler_v2

        out.append(create_scheduler_v2)
    except ImportError:
        pass
    return out


torch.serialization.add_safe_globals(checkpoint_globals())


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> dict[str, Any]:
    """The checkpoint at ``path``, read with ``weights_only=True``; one that refers to a class or function
    outside :func:`checkpoint_globals` is a ``ValueError`` naming it (nothing of it is run)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:GLOBAL|global:?)\s+([\w.]+)", str(e))
        what = f"it asks for {found.group(1)}" if found else str(e).strip().splitlines()[-1]
        raise ValueError(
            f"{path}: refused — it refers to something a cervspine checkpoint never holds, and loading it "
            f"could run code ({what})"
        ) from e
