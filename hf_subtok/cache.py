"""`SubTokenCache`: a transformers `Cache` of `SubTokenLayer`s."""

from __future__ import annotations

from transformers.cache_utils import Cache

from hf_subtok.attention import check_supported, install_attention
from hf_subtok.config import SubTokenConfig
from hf_subtok.presets import resolve_config
from hf_subtok.prompt_planner import PromptPlanner
from hf_subtok.scorers import RopeInfo, get_group_scorer, get_token_scorer
from hf_subtok.storage import SubTokenLayer


class SubTokenCache(Cache):
    """KV cache that keeps whole keys and only the most useful value groups of each token.

    ```python
    cache = SubTokenCache(model, SubTokenConfig(num_groups=8, keep_groups=3))
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)
    cache.memory_report()["ratio"]
    ```

    Building the cache switches `model` to hf-subtok's attention function (see
    `hf_subtok.attention`); the function serves any other cache unchanged, and
    `hf_subtok.uninstall_attention(model)` switches back.

    Args:
        model: a Llama, Mistral, Qwen2 or Qwen3 causal LM.
        config: a `SubTokenConfig`, a preset name (see `hf_subtok.presets`) or None for defaults.
        router: a learned router (`hf_subtok.routers.RouterAdapter`) trained for `model`: its
            per-layer group scorer (and token scorer, if it has one) replace the config's.
    """

    def __init__(self, model, config: SubTokenConfig | str | None = None, router=None):
        check_supported(model)
        self.config = resolve_config(config)
        text_config = model.config.get_text_config(decoder=True)
        self.head_dim = getattr(text_config, "head_dim", None) or (
            text_config.hidden_size // text_config.num_attention_heads
        )
        self.model_dtype = model.dtype
        num_layers = text_config.num_hidden_layers
        if router is not None:
            router.check_model(model)
            if router.config.num_groups != self.config.num_groups:
                raise ValueError(
                    f"router was trained with num_groups={router.config.num_groups}, "
                    f"the config has num_groups={self.config.num_groups}"
                )
        self.layer_configs = self.config.layer_settings(num_layers)
        if self.config.evicts_tokens:
            if self.head_dim % self.config.num_groups:
                raise ValueError(
                    f"num_groups must divide head_dim={self.head_dim}, got {self.config.num_groups}"
                )
            self.keep_groups = self.config.keep_groups  # None: each layer's prefill plan picks K
        else:
            self.keep_groups = self.config.resolve_keep_groups(
                self.head_dim, self.model_dtype.itemsize
            )
        self.planner = self._planner(num_layers)
        self.rope = RopeInfo.from_model(model)
        layers = [self._layer(i, router) for i in range(num_layers)]
        super().__init__(layers=layers)
        install_attention(model)

    def _planner(self, num_layers: int) -> PromptPlanner | None:
        """The cross-layer planner, for adaptive budgets over the layers without a fixed one."""
        if not self.config.evicts_tokens or self.config.layer_budgets != "adaptive":
            return None
        fixed = {
            i
            for o in self.config.overrides
            if o.budget is not None
            for i in range(o.first, o.last + 1)
        }
        shared = num_layers - len(fixed)
        return PromptPlanner(shared) if shared > 1 else None

    def _layer(self, layer_idx: int, router) -> SubTokenLayer:
        config = self.layer_configs[layer_idx]
        scorer = (
            router.group_scorer(layer_idx)
            if router is not None
            else get_group_scorer(config.router)
        )
        token_scorer = None
        if config.evicts_tokens:
            token_scorer = router.token_scorer(layer_idx) if router is not None else None
            token_scorer = token_scorer or get_token_scorer(config.token_scorer)
        budget_fixed = any(
            o.budget is not None and o.first <= layer_idx <= o.last for o in self.config.overrides
        )
        planner = None if budget_fixed else self.planner
        return SubTokenLayer(config, self.keep_groups, scorer, token_scorer, planner, self.rope)

    @classmethod
    def from_dense(
        cls, model, config: SubTokenConfig | str | None, dense_cache: Cache
    ) -> SubTokenCache:
        """The cache a prefill through `SubTokenCache` would leave, built from a filled dense cache.

        Prefill attention is exact, so one dense prefill can be shared by several
        configurations (the benchmark does this).
        """
        cache = cls(model, config)
        for layer_idx, layer in enumerate(dense_cache.layers):
            if layer.keys is not None and layer.keys.numel():
                cache.update(layer.keys, layer.values, layer_idx)
        return cache

    def memory_report(self) -> dict:
        """Bytes held by the cache, measured from its tensors' storages.

        `dense_bytes` is what a `DynamicCache` would hold for the same tokens (keys and values
        of every seen token in the cache's dtype); `ratio = stored_bytes / dense_bytes`.
        """
        stored = dense = 0
        parts: dict[str, int] = {}
        per_layer = []
        for layer in self.layers:
            tensors = layer.stored_tensors()
            layer_bytes = 0
            for name, tensor in tensors.items():
                nbytes = tensor.untyped_storage().nbytes()
                parts[name] = parts.get(name, 0) + nbytes
                layer_bytes += nbytes
            layer_dense = layer.dense_bytes()
            per_layer.append(
                {
                    "stored_bytes": layer_bytes,
                    "dense_bytes": layer_dense,
                    "ratio": layer_bytes / layer_dense if layer_dense else 0.0,
                    "keep_groups": layer.keep_groups,
                    "bits": layer.storage.bits if tensors else None,
                    "tokens_stored": layer.packed_keys.shape[-2] if tensors else 0,
                    "tokens_per_head": layer.tokens_per_head(),
                    # packed tokens per row that keep every group (adaptive span)
                    "wide_tokens": 0 if layer.wide_norms is None else layer.wide_norms.shape[-1],
                }
            )
            stored += layer_bytes
            dense += layer_dense
        first = self.layers[0] if self.layers else None
        return {
            "stored_bytes": stored,
            "dense_bytes": dense,
            "ratio": stored / dense if dense else 0.0,
            "tokens_seen": first.seen_tokens if first else 0,
            "tokens_packed": first.packed_keys.shape[-2] if first and first.is_initialized else 0,
            "keep_groups": [layer.keep_groups for layer in self.layers],
            "num_groups": self.config.num_groups,
            "parts": parts,
            "per_layer": per_layer,
        }
