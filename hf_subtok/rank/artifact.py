"""`RankBases`: calibrated bases of every layer that save, load and publish like a Hub model.

Saved layout (one folder, or one Hub repo):

```
config.json          BasesConfig: base-model identity, shapes, calibration, held-out errors
bases.safetensors    key_basis, value_basis [L, Hkv, D, D]; *_mean, *_variance [L, Hkv, D] (float32)
README.md            model card from hf_subtok/model_cards/bases_card.md
```

Files are written with `routers.files.write_files` (each atomically, only once all were
written: a failed save leaves the previous artifact as it was); loading refuses pickle files,
a truncated or corrupt safetensors file, and tensors of another shape than the config says.
"""

from __future__ import annotations

from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelHubMixin

from hf_subtok.rank.card import TAGS, render_card
from hf_subtok.rank.config import BasesConfig
from hf_subtok.rank.projection import LayerBases
from hf_subtok.routers.files import (
    hub_folder,
    json_writer,
    load_tensors,
    read_json,
    refuse_pickles,
    safetensors_writer,
    write_files,
)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "bases.safetensors"


class RankBases(ModelHubMixin, library_name="hf-subtok", tags=list(TAGS)):
    """Per-layer, per-KV-head key and value bases of one model (`hf-subtok calibrate` makes them).

    ```python
    bases = RankBases.from_pretrained("user/smollm2-subtok-bases")  # or a folder
    bases.check_model(model)
    layer = bases.layer(3)  # LayerBases, for project_tokens / rank_view
    ```

    Args:
        config: the `BasesConfig` (identity and shapes).
        tensors: name -> tensor, exactly `config.tensor_shapes()` (float32 on any device).
    """

    def __init__(self, config: BasesConfig, tensors: dict[str, torch.Tensor]):
        if not isinstance(config, BasesConfig):
            raise ValueError(f"config must be a BasesConfig, got {type(config).__name__}")
        expected = config.tensor_shapes()
        if set(tensors) != set(expected):
            raise ValueError(f"tensors must be exactly {sorted(expected)}, got {sorted(tensors)}")
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise ValueError(f"tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape} from the config")
        self.config = config
        self.tensors = dict(tensors)

    # --- what a cache calls ---

    def check_model(self, model) -> None:
        """Raise `ValueError` naming each difference between `model` and the bases' base model."""
        diffs = self.config.differences(model)
        if diffs:
            raise ValueError(f"bases calibrated for {self.config.base_model!r} do not fit this model: " + "; ".join(diffs))

    def layer(self, layer_idx: int) -> LayerBases:
        """Layer `layer_idx`'s `LayerBases` (views of the held tensors; means None when not centered)."""
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or not 0 <= layer_idx < self.config.num_layers:
            raise ValueError(f"layer_idx must be in 0..{self.config.num_layers - 1}, got {layer_idx!r}")
        t = {name: tensor[layer_idx] for name, tensor in self.tensors.items()}
        centered = self.config.centered
        return LayerBases(
            t["key_basis"],
            t["value_basis"],
            t["key_mean"] if centered else None,
            t["value_mean"] if centered else None,
            t["key_variance"],
            t["value_variance"],
        )

    def nbytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of every layer's bases and means in `dtype` (default float32, as saved): what a
        cache holding all of them at full width adds to its stored bytes."""
        return sum(self.layer(i).nbytes(dtype) for i in range(self.config.num_layers))

    def to(self, dtype: torch.dtype | None = None, device=None) -> RankBases:
        """These bases with every tensor on `device` in `dtype` (a new object)."""
        return RankBases(self.config, {k: v.to(device=device, dtype=dtype) for k, v in self.tensors.items()})

    # --- saving and loading ---

    def save_pretrained(self, save_directory, *, config=None, repo_id=None, push_to_hub=False, model_card_kwargs=None, **push_to_hub_kwargs):
        """Write `config.json`, `bases.safetensors` and `README.md` into `save_directory` (created
        when missing), each replaced atomically and only after all were written; other files in
        the folder stay. `config` is not used (the `BasesConfig` is the config)."""
        self._save_pretrained(Path(save_directory), {"repo_id": repo_id, **(model_card_kwargs or {})})
        if push_to_hub:
            return self.push_to_hub(repo_id=repo_id or Path(save_directory).absolute().name, **push_to_hub_kwargs)
        return None

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Upload the saved files (config, safetensors, README.md card) to the Hub repo `repo_id`."""
        card_kwargs = {**(kwargs.pop("model_card_kwargs", None) or {}), "repo_id": repo_id}
        return super().push_to_hub(repo_id, model_card_kwargs=card_kwargs, **kwargs)

    def _save_pretrained(self, save_directory: Path, model_card_kwargs: dict | None = None) -> None:
        write_files(
            save_directory,
            {
                WEIGHTS_FILE: safetensors_writer({k: v.float() for k, v in self.tensors.items()}),
                "README.md": self.generate_model_card(**(model_card_kwargs or {})).save,
                CONFIG_FILE: json_writer(self.config.to_dict()),  # last: loaders read it first
            },
        )

    def generate_model_card(self, repo_id: str | None = None, **kwargs) -> ModelCard:
        """README.md: YAML metadata, usage code, calibration and held-out errors (`hf_subtok/model_cards/`)."""
        return ModelCard(render_card(self.config, self.nbytes(torch.float32), repo_id))

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path, *, revision=None, cache_dir=None, force_download=False,
        local_files_only=False, token=None, **kwargs,
    ) -> RankBases:
        """Load from a folder or a Hub repo id (`revision`: branch, tag or commit of a repo).

        Raises `ValueError` for a missing or malformed config, a corrupt or truncated weights file,
        tensors whose names or shapes differ from the config, pickle files, or a repo that cannot
        be found (offline: not in the cache).
        """
        if kwargs:
            raise ValueError(f"unexpected arguments for RankBases.from_pretrained: {sorted(kwargs)}")
        folder = hub_folder(
            str(pretrained_model_name_or_path), revision=revision, cache_dir=cache_dir,
            force_download=force_download, local_files_only=local_files_only, token=token, kind="bases",
        )
        return cls.from_folder(folder)

    @classmethod
    def from_folder(cls, folder) -> RankBases:
        """Load saved bases from a folder, checking every file (see `from_pretrained`)."""
        folder = Path(folder)
        refuse_pickles(folder)
        config = BasesConfig.from_dict(read_json(folder / CONFIG_FILE), source=str(folder / CONFIG_FILE))
        expected = {name: torch.Size(shape) for name, shape in config.tensor_shapes().items()}
        tensors = load_tensors(folder / WEIGHTS_FILE, expected)
        for name, tensor in tensors.items():
            if tensor.dtype != torch.float32:
                raise ValueError(f"{folder / WEIGHTS_FILE}: tensor {name!r} is {tensor.dtype}, expected torch.float32")
        return cls(config, tensors)
