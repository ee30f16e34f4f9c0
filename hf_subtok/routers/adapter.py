"""`RouterAdapter`: a trained router (+ its LoRA) that saves, loads and publishes like a Hub model.

Saved layout (one folder, or one Hub repo):

```
config.json                  RouterConfig: base-model identity, groups, budget, metrics
router.safetensors           every layer's GroupRouter (and TokenSelector) weights
lora/adapter_config.json     a standard PEFT LoRA adapter (when trained with one):
lora/adapter_model.safetensors   PeftModel.from_pretrained(model, repo, subfolder="lora")
README.md                    model card with YAML metadata and the measured metrics
```

`save_pretrained` writes these files (each atomically) and leaves every other file in the folder
alone, as `PreTrainedModel.save_pretrained` does.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelHubMixin

from hf_subtok.routers.card import TAGS, render_card
from hf_subtok.routers.config import RouterConfig
from hf_subtok.routers.files import (
    hub_folder,
    json_writer,
    load_tensors,
    read_json,
    refuse_pickles,
    safetensors_writer,
    write_files,
)
from hf_subtok.routers.modules import RouterModules
from hf_subtok.routers.scorers import LearnedGroupScorer, LearnedTokenScorer

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "router.safetensors"
LORA_DIR = "lora"
LORA_CONFIG = "adapter_config.json"
LORA_WEIGHTS = "adapter_model.safetensors"
PEFT_HINT = "pip install 'hf-subtok[train]' (or pip install peft)"


class LoraWeights:
    """A PEFT LoRA adapter held in memory: its `adapter_config.json` dict and its tensors."""

    def __init__(self, config: dict, tensors: dict[str, torch.Tensor]):
        if config.get("peft_type") != "LORA":
            raise ValueError(
                f"{LORA_CONFIG} must describe a LoRA adapter (peft_type 'LORA'), got {config.get('peft_type')!r}"
            )
        if not any("lora_A" in name for name in tensors) or not any(
            "lora_B" in name for name in tensors
        ):
            raise ValueError(
                f"{LORA_WEIGHTS} must hold lora_A and lora_B tensors, got {sorted(tensors)[:4]}"
            )
        self.config = config
        self.tensors = tensors

    @classmethod
    def load(cls, folder: Path) -> LoraWeights:
        """Read a PEFT adapter folder (safetensors only)."""
        if not folder.is_dir():
            raise ValueError(
                f"{folder} is missing: config.json says the router was trained with a LoRA adapter"
            )
        refuse_pickles(folder)
        return cls(read_json(folder / LORA_CONFIG), load_tensors(folder / LORA_WEIGHTS))

    def writers(self, prefix: str = "") -> dict:
        """`write_files` writers of the adapter's two files, named `prefix + file name`."""
        return {
            prefix + LORA_CONFIG: json_writer(self.config, sort_keys=True),
            prefix + LORA_WEIGHTS: safetensors_writer(self.tensors),
        }

    def save(self, folder: Path) -> None:
        """Write the adapter's files into `folder` (other files there stay)."""
        write_files(folder, self.writers())


class RouterAdapter(
    ModelHubMixin,
    library_name="hf-subtok",
    tags=list(TAGS),
):
    """A learned router for one base model: per-layer group scorers, token scorers and a LoRA.

    ```python
    router = RouterAdapter.from_pretrained("user/smollm2-subtok-router")  # or a folder
    model = router.apply_lora(model)
    cache = SubTokenCache(model, router.subtok_config(), router=router)
    ```

    Args:
        router_config: what the router was trained for (`RouterConfig`).
        modules: the trained `RouterModules` (fresh, untrained ones when None).
        lora: the LoRA trained with the router, or None.
    """

    def __init__(
        self,
        router_config: RouterConfig,
        modules: RouterModules | None = None,
        lora: LoraWeights | None = None,
    ):
        if not isinstance(router_config, RouterConfig):
            raise ValueError(
                f"router_config must be a RouterConfig, got {type(router_config).__name__}"
            )
        if (lora is None) != (router_config.lora_r == 0):
            raise ValueError(
                f"lora_r={router_config.lora_r} in the config, but lora is {'missing' if lora is None else 'given'}"
            )
        self.config = router_config
        self.modules = (modules or RouterModules.from_config(router_config)).eval()
        self.lora = lora

    # --- what the cache calls ---

    def check_model(self, model) -> None:
        """Raise `ValueError` naming each difference between `model` and the router's base model."""
        diffs = self.config.differences(model)
        if diffs:
            raise ValueError(
                f"router trained for {self.config.base_model!r} does not fit this model: "
                + "; ".join(diffs)
            )

    def group_scorer(self, layer_idx: int) -> LearnedGroupScorer:
        """Layer `layer_idx`'s value-group scorer (a `hf_subtok.scorers.GroupScorer`)."""
        return LearnedGroupScorer(self.modules.groups[self._layer(layer_idx)])

    def token_scorer(self, layer_idx: int) -> LearnedTokenScorer | None:
        """Layer `layer_idx`'s query-aware token scorer, or None when the router has none."""
        index = self._layer(layer_idx)
        return (
            None
            if self.modules.selectors is None
            else LearnedTokenScorer(self.modules.selectors[index])
        )

    def subtok_config(self, **overrides):
        """The `SubTokenConfig` the router was trained for (K groups of G per token, no eviction).

        `overrides` replace fields. The LoRA is trained for exactly this group budget: for a
        configuration that evicts tokens (e.g. `budget=0.3, axes="both"`, where the learned
        selector ranks tokens) pass the router to the cache of the base model, without
        `apply_lora`.
        """
        from hf_subtok import SubTokenConfig

        settings = {
            "num_groups": self.config.num_groups,
            "keep_groups": self.config.keep_groups,
            "budget": self.config.budget,
            "axes": "groups",
        }
        return SubTokenConfig(**{**settings, **overrides})

    def apply_lora(self, model):
        """Merge the router's LoRA into `model` (in place) and return the plain model.

        Goes through `PeftModel.from_pretrained` on the saved adapter, as a user would. Without
        a LoRA the model is returned unchanged (after the identity check).
        """
        self.check_model(model)
        if self.lora is None:
            return model
        try:
            from peft import PeftModel
        except ImportError as e:
            raise ImportError(f"applying a router's LoRA needs peft: {PEFT_HINT}") from e
        with tempfile.TemporaryDirectory(prefix="hf-subtok-lora-") as tmp:
            self.lora.save(Path(tmp))
            peft_model = PeftModel.from_pretrained(model, tmp)
        return peft_model.merge_and_unload().eval()

    # --- saving and loading ---

    def save_pretrained(
        self,
        save_directory,
        *,
        config=None,
        repo_id=None,
        push_to_hub=False,
        model_card_kwargs=None,
        **push_to_hub_kwargs,
    ):
        """Write the router's files into `save_directory` (created when missing).

        Writes `config.json`, `router.safetensors`, `README.md` (the model card, regenerated:
        it quotes this config's metrics) and, with a LoRA, `lora/adapter_config.json` and
        `lora/adapter_model.safetensors`; each file is replaced atomically and only after all
        were written, so an error leaves the previous checkpoint as it was. Other files in the
        folder stay; a LoRA adapter from an earlier save is removed when this router has none.
        `config` is not used (the `RouterConfig` is the config).
        """
        card_kwargs = {"repo_id": repo_id, **(model_card_kwargs or {})}
        self._save_pretrained(Path(save_directory), card_kwargs)
        if push_to_hub:
            return self.push_to_hub(
                repo_id=repo_id or Path(save_directory).absolute().name, **push_to_hub_kwargs
            )
        return None

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Upload the saved folder (config, safetensors, PEFT adapter, README.md card) to `repo_id`."""
        card_kwargs = {**(kwargs.pop("model_card_kwargs", None) or {}), "repo_id": repo_id}
        return super().push_to_hub(repo_id, model_card_kwargs=card_kwargs, **kwargs)

    def _save_pretrained(self, save_directory: Path, model_card_kwargs: dict | None = None) -> None:
        lora_files = [f"{LORA_DIR}/{LORA_CONFIG}", f"{LORA_DIR}/{LORA_WEIGHTS}"]
        writers = {} if self.lora is None else self.lora.writers(f"{LORA_DIR}/")
        writers[WEIGHTS_FILE] = safetensors_writer(self.modules.state_dict())
        writers["README.md"] = self.generate_model_card(**(model_card_kwargs or {})).save
        writers[CONFIG_FILE] = json_writer(self.config.to_dict())  # last: loaders read it first
        write_files(save_directory, writers, remove=lora_files if self.lora is None else ())

    def generate_model_card(self, repo_id: str | None = None, **kwargs) -> ModelCard:
        """README.md: YAML metadata, usage code and the measured metrics (`hf_subtok/model_cards/`)."""
        return ModelCard(render_card(self.config, repo_id))

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        *,
        revision: str | None = None,
        cache_dir=None,
        force_download: bool = False,
        local_files_only: bool = False,
        token=None,
        **kwargs,
    ) -> RouterAdapter:
        """Load from a folder or a Hub repo id (`revision`: branch, tag or commit of a repo).

        Raises `ValueError` for a missing or malformed config, corrupt or truncated weights,
        pickle files, a `revision` given with a local folder (a folder has no revisions), or a
        repo/revision that cannot be found (offline: not in the cache).
        """
        return cls._from_pretrained(
            model_id=str(pretrained_model_name_or_path),
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
            **kwargs,
        )

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision,
        cache_dir,
        force_download,
        local_files_only,
        token,
        **model_kwargs,
    ) -> RouterAdapter:
        # ModelHubMixin.from_pretrained is not used: it reads config.json itself (an AttributeError
        # for a file that is no JSON object) and loads a local folder whatever the revision.
        if model_kwargs:
            raise ValueError(
                f"unexpected arguments for RouterAdapter.from_pretrained: {sorted(model_kwargs)}"
            )
        folder = hub_folder(
            model_id,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
            kind="router",
        )
        return cls.from_folder(folder)

    @classmethod
    def from_folder(cls, folder: Path) -> RouterAdapter:
        """Load a saved router folder, checking every file (see `from_pretrained`)."""
        folder = Path(folder)
        refuse_pickles(folder)
        config = RouterConfig.from_dict(
            read_json(folder / CONFIG_FILE), source=str(folder / CONFIG_FILE)
        )
        modules = RouterModules.from_config(config)
        expected = {name: t.shape for name, t in modules.state_dict().items()}
        modules.load_state_dict(load_tensors(folder / WEIGHTS_FILE, expected))
        lora_weights = folder / LORA_DIR / LORA_WEIGHTS
        if not config.lora_r and lora_weights.exists():
            raise ValueError(
                f"{folder / CONFIG_FILE} says lora_r=0 (no LoRA), but the folder holds "
                f"{LORA_DIR}/{LORA_WEIGHTS}; set lora_r to the adapter's rank or remove {LORA_DIR}/"
            )
        lora = LoraWeights.load(folder / LORA_DIR) if config.lora_r else None
        if lora is not None and lora.config.get("r") != config.lora_r:
            raise ValueError(
                f"{folder / CONFIG_FILE} says lora_r={config.lora_r}, but "
                f"{LORA_DIR}/{LORA_CONFIG} has r={lora.config.get('r')!r}"
            )
        return cls(config, modules, lora)

    def _layer(self, layer_idx: int) -> int:
        if (
            isinstance(layer_idx, bool)
            or not isinstance(layer_idx, int)
            or not 0 <= layer_idx < self.config.num_layers
        ):
            raise ValueError(
                f"layer_idx must be in 0..{self.config.num_layers - 1}, got {layer_idx!r}"
            )
        return layer_idx
