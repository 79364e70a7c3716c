"""timm backbones: any timm name, random init by default, pretrained weights from a local file.

``model.backbone`` in the configs is a partial of :func:`create_backbone` (``_target_``), called by the
LightningModule with ``in_chans``; another factory with that call works too. Checkpoints written before
the configs had a ``_target_`` hold a plain dict of :func:`create_backbone`'s options, also accepted.

``pretrained=True`` without ``weights_path`` takes timm's ImageNet weights from the local Hugging Face /
torch hub cache when they are there, else downloads them; where the hub cannot be reached
(``HF_HUB_OFFLINE=1``, no network) :func:`pretrained_source` says so within seconds
(:class:`PretrainedWeightsUnavailable`, naming the two overrides that run anyway) instead of timm's
minute of retries.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn

from cervspine.io.errors import CervspineInputError

BackboneSpec = Callable[..., nn.Module] | dict[str, Any]
HUB_TIMEOUT_S = 3.0  # how long the hub may take to answer before a run is told it is offline
_TRUE = {"1", "on", "yes", "true"}


class PretrainedWeightsUnavailable(CervspineInputError):
    """``pretrained=True`` but the weights are neither cached nor downloadable from here."""


class WeightsMismatch(CervspineInputError):
    """A weights file that does not fit the backbone it was given to."""


def _hub_offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TIMM_OFFLINE"))


def _answers(url: str, timeout: float) -> str | None:
    """None when a server answers ``url`` (any HTTP status) within ``timeout`` s, else why not. Runs in a
    daemon thread, so a name lookup that hangs cannot hold the caller past the timeout."""
    outcome: dict[str, str | None] = {}

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            outcome["why"] = None
        except urllib.error.HTTPError:  # the server answered: reachable
            outcome["why"] = None
        except Exception as e:  # noqa: BLE001  (DNS, refused, TLS, timeout: all mean "not from here")
            reason = getattr(e, "reason", e)
            outcome["why"] = f"{type(reason).__name__}: {reason}"

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return outcome.get("why", f"no answer within {timeout:.0f} s")


def _cached_file(cfg) -> str | None:
    """The local copy of ``cfg``'s weights (Hugging Face cache, else torch hub cache), if any."""
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for name in names:
            found = try_to_load_from_cache(repo, name, revision=revision or None)
            if isinstance(found, str) and Path(found).is_file():
                return found
    if cfg.url:
        local = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url.split("?")[0])
        if local.is_file():
            return str(local)
    return None


def pretrained_source(name: str, timeout: float = HUB_TIMEOUT_S) -> str | None:
    """Where ``pretrained=True`` gets ``name``'s weights: a cached file's path, or None when timm will
    download them (the hub answered). Raises :class:`PretrainedWeightsUnavailable` within about
    ``timeout`` s when they are not cached and the hub is off or unreachable."""
    try:
        cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
    except RuntimeError as e:
        raise PretrainedWeightsUnavailable(
            f"model.backbone.name={name}: timm has no pretrained weights for it ({e}); "
            "use model.backbone.pretrained=false or another backbone"
        ) from None
    cached = _cached_file(cfg)
    if cached:
        return cached
    if cfg.hf_hub_id:
        from huggingface_hub import constants

        endpoint = os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")
        where, url = f"{cfg.hf_hub_id} on {endpoint}", f"{endpoint}/api/models/{cfg.hf_hub_id}"
    else:
        where = url = cfg.url
    why = "HF_HUB_OFFLINE is set" if _hub_offline() else _answers(url, timeout) if url else "no download URL"
    if why is None:
        return None
    raise PretrainedWeightsUnavailable(
        f"model.backbone.pretrained=true: the ImageNet weights of {name} ({where}) are not in the local "
        f"cache and cannot be downloaded from here ({why}). Either give a local weights file, "
        f"model.backbone.weights_path=/path/to/weights ({name}'s timm .safetensors/.pth/.bin), or "
        "train from random init, model.backbone.pretrained=false. (On a machine that is online, "
        f"python -c \"import timm; timm.create_model('{name}', pretrained=True)\" fills the cache.)"
    )


def check_weights(backbone: Mapping[str, Any] | None, *, read_file: bool = True) -> None:
    """That a ``model.backbone`` config's weights can be had here, told within seconds and before any
    data is touched: its ``weights_path`` file (read and fitted to the backbone unless ``read_file`` is
    false: then only that it exists), else with ``pretrained`` timm's ImageNet weights cached or
    downloadable (:func:`pretrained_source`). Raises :class:`PretrainedWeightsUnavailable`,
    :class:`WeightsMismatch` or ``FileNotFoundError`` naming the override that runs anyway; nothing for a
    backbone without a timm ``name`` (a custom factory) or with neither setting."""
    if backbone is None or not backbone.get("name"):
        return
    weights_path = backbone.get("weights_path")
    if weights_path:
        path = Path(str(weights_path)).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model.backbone.weights_path: pretrained weights file not found: {path}")
        if read_file:
            create_backbone(str(backbone["name"]), in_chans=3, weights_path=str(path))
    elif backbone.get("pretrained"):
        pretrained_source(str(backbone["name"]))


def create_backbone(
    name: str,
    in_chans: int,
    *,
    pretrained: bool = False,
    weights_path: str | None = None,
    drop_path_rate: float | None = None,
    grad_checkpointing: bool = False,
) -> nn.Module:
    """A timm feature extractor (``num_classes=0``; ``.num_features`` gives its width).

    ``grad_checkpointing``: timm's activation checkpointing (each block's activations recomputed in the
    backward pass instead of kept: ~10× less training memory per image for the EfficientNets, slower
    steps; :mod:`cervspine.training.memory` names it where a CPU run would not fit).

    ``weights_path`` loads pretrained weights from a local file (timm adapts the stem to ``in_chans``); a
    file of another architecture raises :class:`WeightsMismatch` naming both. ``pretrained=True`` without
    a path takes the hub cache's copy or downloads it (:func:`pretrained_source`: fails fast offline).
    """
    model = _create(name, in_chans, pretrained, weights_path, drop_path_rate)
    if grad_checkpointing:
        try:
            model.set_grad_checkpointing(True)
        except (AttributeError, NotImplementedError, AssertionError) as e:
            raise CervspineInputError(
                f"model.backbone.grad_checkpointing=true: timm's {name} has no gradient checkpointing ({e})"
            ) from None
    return model


def _create(
    name: str, in_chans: int, pretrained: bool, weights_path: str | None, drop_path_rate: float | None
) -> nn.Module:
    kwargs = {"in_chans": in_chans, "num_classes": 0}
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    if not weights_path and pretrained:
        cached = pretrained_source(name)
        if cached is None:  # timm downloads them
            return timm.create_model(name, pretrained=True, **kwargs)
        return _from_file(name, Path(cached), kwargs)
    if weights_path:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model.backbone.weights_path: pretrained weights file not found: {path}")
        return _from_file(name, path, kwargs)
    return timm.create_model(name, pretrained=False, **kwargs)


class _LoadRecords(logging.Handler):
    """What timm's pretrained loader logs (its non-strict load only logs missing keys, at INFO)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _from_file(name: str, path: Path, kwargs: dict[str, Any]) -> nn.Module:
    """timm's ``name`` with the weights of ``path``; :class:`WeightsMismatch` when they do not fit —
    also where timm's non-strict load (``num_classes=0`` drops the classifier) would leave the backbone's
    missing keys at random init with no more than a log line."""
    records, timm_log = _LoadRecords(), logging.getLogger("timm.models._builder")
    level = timm_log.level
    timm_log.addHandler(records)
    timm_log.setLevel(logging.INFO)
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
        said = _timm_load_keys(records.messages)
        if "Missing key(s)" in said:
            raise RuntimeError(said)
        return model
    except (RuntimeError, KeyError, ValueError, EOFError, OSError) as e:
        text = str(e)
        if any(k in text for k in ("size mismatch", "Missing key", "Unexpected key")):
            what = f"{_mismatch_summary(text)}: it holds another architecture's weights"
        else:
            first = text.splitlines()[0][:200] if text else ""
            what = f"it cannot be read as a state dict, {type(e).__name__}: {first}"
        raise WeightsMismatch(
            f"model.backbone.weights_path={path} does not fit backbone {name} ({what}). Give a weights "
            f"file of {name}, or set model.backbone.name to the file's architecture"
        ) from e
    finally:
        timm_log.removeHandler(records)
        timm_log.setLevel(level)


def _timm_load_keys(messages: list[str]) -> str:
    """timm's "Missing keys (a, b) discovered …" log lines in torch's load_state_dict wording."""
    import re

    lines = []
    for message in messages:
        found = re.match(r"(Missing|Unexpected) keys \((.*)\) (?:discovered|found)", message)
        if found:
            keys = ", ".join(f'"{k}"' for k in found.group(2).split(", "))
            lines.append(f"{found.group(1)} key(s) in state_dict: {keys}.")
    return "\n".join(lines)


def _mismatch_summary(text: str) -> str:
    """'N missing, M unexpected, K other-shape keys, e.g. …' from torch's load_state_dict error."""
    import re

    counts, examples = {}, []
    for line in text.splitlines():
        line = line.strip()
        for label in ("Missing", "Unexpected"):
            if line.startswith(f"{label} key(s)"):
                keys = re.findall(r'"([^"]+)"', line)
                counts[label.lower()] = len(keys)
                examples += keys[:2]
        if line.startswith("size mismatch for"):
            counts["other-shape"] = counts.get("other-shape", 0) + 1
            examples.append(line.split()[3].rstrip(":"))
    parts = ", ".join(f"{n} {label}" for label, n in counts.items())
    return f"{parts} keys, e.g. {', '.join(examples[:3])}" if parts else "keys do not match"


def build_backbone(spec: BackboneSpec, in_chans: int) -> nn.Module:
    """The backbone a config (a factory) or an older checkpoint (a dict) describes, for ``in_chans``."""
    if isinstance(spec, Mapping):
        return create_backbone(in_chans=in_chans, **spec)
    return spec(in_chans=in_chans)


def without_pretrained_weights(spec: BackboneSpec) -> BackboneSpec:
    """``spec`` building the same architecture without fetching or reading pretrained weights (a
    checkpoint's own weights replace them)."""
    off = {"pretrained": False, "weights_path": None}
    if isinstance(spec, Mapping):
        return {**spec, **off}
    if isinstance(spec, functools.partial):
        return functools.partial(spec.func, *spec.args, **{**spec.keywords, **off})
    return spec


def backbone_name(spec: BackboneSpec | None) -> str:
    """The timm name in ``spec`` (for model cards and reports), else the factory's name."""
    if isinstance(spec, Mapping):
        return str(spec.get("name", "?"))
    if isinstance(spec, functools.partial):
        return str(spec.keywords.get("name", getattr(spec.func, "__name__", "?")))
    return getattr(spec, "__name__", "?") if spec is not None else "?"


def fast_backbone(backbone: nn.Module, *, channels_last: bool, compile: bool) -> nn.Module:
    """``backbone`` with NHWC weights (oneDNN/cuDNN then run NHWC kernels end to end) and/or compiled."""
    if channels_last:
        backbone.to(memory_format=torch.channels_last)
    return torch.compile(backbone) if compile else backbone
