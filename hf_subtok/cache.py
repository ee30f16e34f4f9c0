"""`SubTokenCache`: a transformers `Cache` of `SubTokenLayer`s."""

from __future__ import annotations

import dataclasses
import logging
import weakref

import torch
from transformers.cache_utils import Cache

from hf_subtok.allocation.planner import PromptPlanner
from hf_subtok.allocation.policy import KeepAll, TokenPolicy
from hf_subtok.attention import check_supported, install_attention
from hf_subtok.config import SubTokenConfig
from hf_subtok.memory_report import memory_report
from hf_subtok.presets import resolve_config
from hf_subtok.rank.key_bases import pre_rope_key_spaces
from hf_subtok.recipes import apply_recipe
from hf_subtok.scorers import Observation, RopeInfo, get_group_scorer, get_token_scorer
from hf_subtok.storage.layer import SubTokenLayer
from hf_subtok.views import PrefillKV

logger = logging.getLogger(__name__)

# what `from_dense` scores tokens with when it has no prompt queries for the configured scorer
QUERY_FREE_SCORER = "key_norm"
# decoders that refuse a SubTokenCache built for another model (see `_guard_decoder`)
_guarded_decoders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class SubTokenCache(Cache):
    """KV cache that keeps whole keys and only the most useful value groups of each token.

    ```python
    cache = SubTokenCache(model, budget=0.1)  # a tenth of the dense bytes, the table's recipe
    out = model.generate(**inputs, **cache_kwargs(cache), max_new_tokens=64)
    cache.memory_report()["ratio"]
    ```

    Building the cache switches `model` to hf-subtok's attention function (see
    `hf_subtok.attention`); the function serves any other cache unchanged, and
    `hf_subtok.uninstall_attention(model)` switches back.

    A cache serves the model it was built for (one cache per model): another model's forward
    raises `ValueError`. It may be reused for further `generate` calls of that model.

    Args:
        model: a Llama, Mistral, Qwen2 or Qwen3 causal LM.
        config: a `SubTokenConfig`, a preset name (see `hf_subtok.presets`) or None for defaults.
        router: a learned router (`hf_subtok.routers.RouterAdapter`) trained for `model`: its
            per-layer group scorer (and token scorer, if it has one) replace the config's, and
            its `num_groups` is the cache's unless the config sets one.
        **fields: `SubTokenConfig` fields, on top of a preset named by `config` or of the
            defaults (not with a `SubTokenConfig`).

    With a budget below 1 and `recipe="auto"`, the fields left unset come from the recipe
    table for the budget and the model's dtype (`hf_subtok.recipes`): `config` is then the
    configuration in force (every field stated, `recipe=None`) and `recipe` the table row used
    (None without one).
    """

    def __init__(self, model, config: SubTokenConfig | str | None = None, router=None, **fields):
        check_supported(model)
        config = resolve_config(config, fields)
        pinned = set(config.given_fields)  # taken before `replace`, which names every field
        if router is not None and "num_groups" not in pinned:
            config = dataclasses.replace(config, num_groups=router.config.num_groups)
            pinned.add("num_groups")
        self.config, self.recipe = apply_recipe(config, model.dtype, pinned)
        text_config = model.config.get_text_config(decoder=True)
        self.head_dim = getattr(text_config, "head_dim", None) or (
            text_config.hidden_size // text_config.num_attention_heads
        )
        self.num_kv_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
        self.model_dtype = model.dtype
        num_layers = text_config.num_hidden_layers
        name = getattr(model.config, "name_or_path", "")
        self.model_name = type(model).__name__ + (f" {name!r}" if name else "")
        decoder = model.get_decoder()
        self._decoder = weakref.ref(decoder)
        if router is not None:
            router.check_model(model)
            if router.config.num_groups != self.config.num_groups:
                raise ValueError(
                    f"router was trained with num_groups={router.config.num_groups}, "
                    f"the config has num_groups={self.config.num_groups}"
                )
        self.layer_configs = self.config.layer_settings(num_layers)
        # layers whose budget an override fixes: left out of the cross-layer split
        self._budget_fixed = {i for o in self.config.overrides if o.budget is not None for i in o.layers(num_layers)}
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
        key_spaces = [None] * num_layers  # how each layer stores keys before RoPE, if it does
        if self.config.key_space == "pre_rope":
            key_spaces = pre_rope_key_spaces(self.config.key_bases, model, self.rope, num_layers)
        layers = [self._layer(i, router, key_spaces[i]) for i in range(num_layers)]
        super().__init__(layers=layers)
        install_attention(model)
        _guard_decoder(decoder)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """`Cache.update`, after checking that `[B, Hkv, T, D]` `key_states` of layer `layer_idx`
        fit the model the cache was built for (`ValueError` otherwise)."""
        heads, head_dim = key_states.shape[1], key_states.shape[-1]
        if layer_idx >= len(self.layers) or heads != self.num_kv_heads or head_dim != self.head_dim:
            raise ValueError(
                f"this SubTokenCache was built for {self.model_name} ({len(self.layers)} layers, "
                f"{self.num_kv_heads} KV heads of head_dim {self.head_dim}), but layer {layer_idx} handed it "
                f"{heads} KV heads of head_dim {head_dim}: another model; build one cache per model"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def check_decoder(self, decoder) -> None:
        """Raise `ValueError` unless `decoder` (a model's `get_decoder()`) is the one the cache
        was built for."""
        if self._decoder() is not decoder:
            raise ValueError(
                f"this SubTokenCache was built for another model object ({self.model_name}) than the one "
                "running it; build one cache per model"
            )

    def _planner(self, num_layers: int) -> PromptPlans | None:
        """The cross-layer planner, for adaptive budgets over the layers without a fixed one."""
        if not self.config.evicts_tokens or self.config.layer_budgets != "adaptive":
            return None
        shared = num_layers - len(self._budget_fixed)
        return PromptPlans(PromptPlanner(shared)) if shared > 1 else None

    def _layer(self, layer_idx: int, router, key_basis) -> SubTokenLayer:
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
        planner = None if layer_idx in self._budget_fixed else self.planner
        policy = (
            TokenPolicy(scorer, config.num_groups, token_scorer, self.rope)
            if token_scorer is not None
            else KeepAll(scorer, config.num_groups)
        )
        return SubTokenLayer(
            config, self.keep_groups, policy, planner, layers_sharing=len(self.layer_configs), key_basis=key_basis
        )

    @classmethod
    def from_dense(
        cls,
        model,
        config: SubTokenConfig | str | None,
        dense_cache: Cache,
        queries: list[torch.Tensor] | None = None,
    ) -> SubTokenCache:
        """The cache a prefill through `SubTokenCache` would leave, built from a filled dense cache.

        Prefill attention is exact, so one dense prefill can be shared by several
        configurations (the benchmark does this).

        Args:
            model: the model that filled `dense_cache`.
            config: as for `SubTokenCache`.
            dense_cache: a cache holding the prompt's (unpadded) keys and values.
            queries: per layer, the prompt's queries `[B, Hq, W, D]` (RoPE applied; the last
                `obs_window` are used), for token scorers that need them (`snapkv`, the
                default). Without them such scorers are replaced by `QUERY_FREE_SCORER`, with
                a warning.
        """
        config, recipe = apply_recipe(resolve_config(config), model.dtype)  # before scorers are swapped
        if queries is None:
            config = _without_query_scorers(config)
        elif len(queries) != len(dense_cache.layers):
            raise ValueError(
                f"queries must hold one tensor per layer of dense_cache ({len(dense_cache.layers)}), "
                f"got {len(queries)}"
            )
        cache = cls(model, config)
        cache.recipe = recipe
        scalings = _attention_scalings(model)
        for layer_idx, layer in enumerate(dense_cache.layers):
            if layer.keys is None or not layer.keys.numel():
                continue
            view, _ = cache.update(layer.keys, layer.values, layer_idx)
            if isinstance(view, PrefillKV) and queries is not None:  # as attention would observe
                query = queries[layer_idx][:, :, -view.obs_window :]  # [B, Hq, W, D]
                scaling = scalings.get(layer_idx, query.shape[-1] ** -0.5)
                view.observer(Observation(query, None, scaling))
        return cache

    @property
    def is_croppable(self) -> bool:
        """Whether `crop` restores exactly the cache that never saw the cropped tokens: only
        when every layer stores losslessly (transformers >= 5.25 refuses assisted decoding
        otherwise; on 5.2 the layers' `crop` raises)."""
        return all(layer.is_croppable for layer in self.layers)

    def memory_report(self) -> dict:
        """Bytes held, measured from the tensors' storages (see `hf_subtok.memory_report`):
        `stored_bytes`, `dense_bytes` (what a `DynamicCache` would hold), `ratio`, `target_bytes`
        (what the budget or the short-context floor allows), `parts` and `per_layer` rows."""
        return memory_report(self)


class PromptPlans:
    """The cache's cross-layer allocator call: layers submit their scored prompts here; the
    planner (`allocation.planner.PromptPlanner`) splits the bytes from their evidence, and each
    layer is handed its share to pack. The planner sees numbers and tensors, never a layer."""

    def __init__(self, planner: PromptPlanner):
        self.planner = planner
        self._rows: dict[int, PromptPlans] = {0: self}

    def for_row(self, row: int) -> PromptPlans:
        """The plans of batch row `row` (each row planned on its own prompt, as if alone)."""
        if row not in self._rows:
            plans = PromptPlans(self.planner.for_row(row))
            plans._rows = self._rows
            self._rows[row] = plans
        return self._rows[row]

    def submit(self, layer: SubTokenLayer) -> None:
        """A layer's scored prompt: its own bytes per row and its evidence go to the planner;
        once every expected layer submitted, each packs within its share."""
        self._pack(self.planner.submit(layer, layer.prompt_row_bytes(), layer.prompt_evidence()))

    def flush(self) -> None:
        """Split among the layers that submitted so far and pack them (a forward cut short)."""
        self._pack(self.planner.flush())

    @staticmethod
    def _pack(shares: list[tuple[SubTokenLayer, float]]) -> None:
        for layer, row_bytes in shares:
            layer.pack_prompt(row_bytes)


def _without_query_scorers(config: SubTokenConfig) -> SubTokenConfig:
    """`config` with every token scorer that needs the prompt's queries (the config's and the
    overrides') replaced by `QUERY_FREE_SCORER`, logged at warning level."""
    if not config.evicts_tokens:
        return config
    replaced = set()

    def query_free(name: str | None) -> str | None:
        if name is None or not get_token_scorer(name).needs_queries:
            return name
        replaced.add(name)
        return QUERY_FREE_SCORER

    token_scorer = query_free(config.token_scorer)
    overrides = [dataclasses.replace(o, token_scorer=query_free(o.token_scorer)) for o in config.overrides]
    if not replaced:
        return config
    logger.warning(
        "from_dense has no prompt queries for token_scorer %s; scoring tokens with %r instead "
        "(pass queries= to use them)",
        " and ".join(repr(name) for name in sorted(replaced)),
        QUERY_FREE_SCORER,
    )
    return dataclasses.replace(config, token_scorer=token_scorer, overrides=overrides)


def _attention_scalings(model) -> dict[int, float]:
    """`{layer_idx: softmax scale}` of the model's attention modules."""
    return {
        module.layer_idx: module.scaling
        for module in model.modules()
        if isinstance(getattr(module, "layer_idx", None), int) and isinstance(getattr(module, "scaling", None), float)
    }


def _guard_decoder(decoder) -> None:
    """Make `decoder` refuse, when it runs, a `SubTokenCache` built for another model (one
    forward pre-hook per decoder, however many caches are built for it)."""
    if decoder not in _guarded_decoders:
        _guarded_decoders[decoder] = decoder.register_forward_pre_hook(_refuse_foreign_cache, with_kwargs=True)


def _refuse_foreign_cache(decoder, args, kwargs) -> None:
    for name in ("cache", "past_key_values"):
        cache = kwargs.get(name)
        if isinstance(cache, SubTokenCache):
            cache.check_decoder(decoder)
