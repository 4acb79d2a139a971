"""A finished (or interrupted) training run as the output end sees it: its config, decoder and learned codes.

A run directory ``<checkpoint.storage_path>/<run_name>/`` holds ``config.yaml`` (the resolved config) and Ray
Train's ``checkpoint_*/state.pt`` snapshots (see ``sdf_ray.checkpoint``). The latest checkpoint is the one Ray's
``checkpoint_manager_snapshot.json`` names, else the newest ``checkpoint_*`` directory (Ray names them by time).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdf_ray import config as config_mod
from sdf_ray.checkpoint import STATE_FILE
from sdf_ray.errors import ConfigError
from sdf_ray.model import DeepSDFDecoder
from sdf_ray.run_files import RESOLVED_CONFIG_FILE

RAY_CHECKPOINT_INDEX = "checkpoint_manager_snapshot.json"


@dataclass
class TrainedRun:
    directory: Path
    config: config_mod.TrainConfig
    checkpoint: Path
    """The checkpoint directory the decoder and codes come from."""
    step: int
    decoder_state: dict[str, torch.Tensor]
    latents_NL: torch.Tensor
    """Every training scene's code, in global scene order (CPU, fp32)."""

    @property
    def latent_size(self) -> int:
        return self.config.model.latent_size

    def decoder_payload(self) -> dict[str, Any]:
        """What a remote process needs to rebuild the decoder: the model section and the weights (picklable)."""
        return {"model": config_mod.to_dict(self.config)["model"], "state": self.decoder_state}


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint directory holding a ``state.pt``, or None."""
    index = run_dir / RAY_CHECKPOINT_INDEX
    try:
        latest = json.loads(index.read_text())["latest_checkpoint_result"]["checkpoint_dir_name"]
        if isinstance(latest, str) and (run_dir / latest / STATE_FILE).is_file():
            return run_dir / latest
    except (OSError, ValueError, KeyError, TypeError):
        pass
    found = sorted(p.parent for p in run_dir.glob(f"checkpoint_*/{STATE_FILE}"))
    return found[-1] if found else None


def load_trained_run(run_dir: str | Path) -> TrainedRun:
    """Read a run directory; a missing directory, config or checkpoint is a ``ConfigError`` (one line)."""
    d = Path(run_dir).expanduser()
    if not d.is_dir():
        raise ConfigError(f"--run {d}: not a run directory (it does not exist)")
    ckpt = latest_checkpoint(d)
    if ckpt is None:
        raise ConfigError(f"--run {d}: no checkpoint (no checkpoint_*/{STATE_FILE}); train it first, or point "
                          f"--run at <checkpoint.storage_path>/<run name>")
    cfg_path = d / RESOLVED_CONFIG_FILE
    if not cfg_path.is_file():
        cfg_path = ckpt / RESOLVED_CONFIG_FILE
    if not cfg_path.is_file():
        raise ConfigError(f"--run {d}: no {RESOLVED_CONFIG_FILE} next to its checkpoints")
    cfg = config_mod.load(cfg_path)
    try:
        snap = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)
        decoder_state = snap["decoder"]
        latents = snap["latents"].float()
        step = int(snap.get("step", 0))
    except (OSError, RuntimeError, KeyError, EOFError, ValueError) as exc:
        raise ConfigError(f"--run {d}: unreadable checkpoint {ckpt.name}/{STATE_FILE} ({type(exc).__name__})") from None
    bad = sum(int((~torch.isfinite(t)).sum()) for t in decoder_state.values()
              if isinstance(t, torch.Tensor) and t.is_floating_point())
    if bad:
        # A diverged or damaged checkpoint: every shape would fail (or, where a fused ReLU maps NaN to 0, come
        # out as finite nonsense), so say so once, before Ray starts.
        raise ConfigError(f"--run {d}: checkpoint {ckpt.name} has {bad} non-finite decoder weights; use an earlier "
                          f"checkpoint or retrain")
    if latents.ndim != 2 or latents.shape[1] != cfg.model.latent_size:
        raise ConfigError(f"--run {d}: checkpoint codes have shape {tuple(latents.shape)}, config says latent_size "
                          f"{cfg.model.latent_size}")
    return TrainedRun(d, cfg, ckpt, step, decoder_state, latents)


def build_decoder(payload: dict[str, Any], device: torch.device | str) -> DeepSDFDecoder:
    """The run's decoder from :meth:`TrainedRun.decoder_payload`: on ``device``, eval mode, frozen."""
    from sdf_ray.shapes.reconstruct import freeze

    model_cfg = config_mod.from_dict({"model": payload["model"]}).model
    decoder = DeepSDFDecoder(model_cfg)
    decoder.load_state_dict(payload["state"])
    decoder.to(device)
    freeze(decoder)
    return decoder
