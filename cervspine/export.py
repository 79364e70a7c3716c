"""``python -m cervspine.export run_dir=R out=DIR``: the trained run as a model bundle — ONNX graphs of
stage 1 and of each stage-2 member, a manifest with what inference needs (input settings, calibration, the
operating point, the ensemble, versions, checksums) and the model card; see :mod:`cervspine.bundle`.
Explicit ``ckpt.stage1=… ckpt.stage2=…`` win over the run's, as in predict; ``checkpoints=true`` also
copies the checkpoints in (``backend=torch`` from the bundle)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

import cervspine.config  # noqa: F401  (registers resolvers)
from cervspine.bundle.export import export_run
from cervspine.bundle.manifest import read_manifest

__all__ = ["export", "main"]


def export(cfg: DictConfig) -> dict:
    """Write the bundle the config describes; its manifest (checked back: version and checksums)."""
    stage2 = cfg.ckpt.stage2
    stage2 = OmegaConf.to_container(stage2) if OmegaConf.is_list(stage2) else stage2
    path = export_run(
        cfg.out,
        cfg.run_dir,
        cfg.ckpt.stage1,
        stage2,
        operating_point=cfg.get("operating_point"),
        model_card=cfg.get("model_card"),
        include_checkpoints=bool(cfg.get("checkpoints")),
        overwrite=bool(cfg.get("overwrite")),
    )
    return read_manifest(path.parent)


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    manifest = export(cfg)
    print(f"bundle: {cfg.out} (manifest version {manifest['version']}, image size {manifest['image_size']})")
    for name, entry in manifest["files"].items():
        print(f"  {name:<28} {entry['bytes'] / 2**20:8.1f} MiB  sha256 {entry['sha256'][:16]}…")
    worst = max(manifest["export_check"]["max_abs_diff"].values())
    print(f"graphs vs torch on ONNX Runtime: max |Δ| {worst:.1e}")


if __name__ == "__main__":
    main()
