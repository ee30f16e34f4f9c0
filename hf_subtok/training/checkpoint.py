"""Training checkpoints: trainable weights and optimizer state in safetensors, the rest in JSON.

A checkpoint folder is written beside its final place and renamed into it, so an interrupted
save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from hf_subtok.routers.files import atomic_directory, load_tensors, read_json, refuse_pickles

TENSORS = "state.safetensors"
META = "state.json"


def save_checkpoint(
    folder: Path, *, step: int, params: dict[str, torch.nn.Parameter], optimizer, meta: dict
) -> None:
    """Write `params` (by name), the optimizer's state and `meta` (JSON) to `folder`."""
    tensors = {f"param/{name}": p.detach().contiguous().cpu() for name, p in params.items()}
    index = {id(p): name for name, p in params.items()}
    opt_meta = {"param_groups": [], "scalars": {}}
    for group in optimizer.param_groups:
        opt_meta["param_groups"].append(
            {
                "params": [index[id(p)] for p in group["params"]],
                **{k: v for k, v in group.items() if k != "params"},
            }
        )
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value):
                    tensors[f"opt/{index[id(p)]}/{key}"] = value.detach().contiguous().cpu()
                else:
                    opt_meta["scalars"][f"{index[id(p)]}/{key}"] = value
    tensors["rng/torch"] = torch.get_rng_state()
    with atomic_directory(folder) as tmp:
        save_file(tensors, str(tmp / TENSORS), metadata={"format": "pt"})
        (tmp / META).write_text(
            json.dumps({"step": step, "optimizer": opt_meta, **meta}, indent=2), encoding="utf-8"
        )


def load_checkpoint(folder: Path, *, params: dict[str, torch.nn.Parameter], optimizer) -> dict:
    """Restore `params` and the optimizer from `folder`; return its JSON meta (with `step`).

    Raises `ValueError` when the checkpoint is unreadable or was written for other parameters.
    """
    folder = Path(folder)
    refuse_pickles(folder)
    meta = read_json(folder / META)
    tensors = load_tensors(folder / TENSORS)
    saved = {name.removeprefix("param/") for name in tensors if name.startswith("param/")}
    if saved != set(params):
        raise ValueError(
            f"checkpoint {folder} holds other parameters than this run trains: missing "
            f"{sorted(set(params) - saved)[:3]}, unknown {sorted(saved - set(params))[:3]} (use another --out)"
        )
    with torch.no_grad():
        for name, p in params.items():
            if tensors[f"param/{name}"].shape != p.shape:
                raise ValueError(
                    f"checkpoint {folder}: {name} has shape {tuple(tensors[f'param/{name}'].shape)}, "
                    f"expected {tuple(p.shape)}"
                )
            p.copy_(tensors[f"param/{name}"])
    groups = meta["optimizer"]["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(
            f"checkpoint {folder} has {len(groups)} optimizer groups, this run {len(optimizer.param_groups)}"
        )
    for group, saved_group in zip(optimizer.param_groups, groups, strict=True):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
        for p, name in zip(group["params"], saved_group["params"], strict=True):
            state = {
                key.split("/", 2)[2]: t
                for key, t in tensors.items()
                if key.startswith(f"opt/{name}/")
            }
            scalars = meta["optimizer"]["scalars"]
            state.update(
                {
                    k.removeprefix(f"{name}/"): v
                    for k, v in scalars.items()
                    if k.startswith(f"{name}/")
                }
            )
            if state:
                optimizer.state[p] = state
    torch.set_rng_state(tensors["rng/torch"])
    return meta
