"""`memory_report(cache)`: the bytes a `SubTokenCache` holds, measured from its tensors."""

from __future__ import annotations

import torch


def memory_report(cache) -> dict:
    """Bytes held by `cache`, each tensor storage counted once (a rotation matrix the layers
    share counts for the first layer holding it), with the dense bytes a `DynamicCache` would
    hold for the same tokens and the bytes the budget (or the `floor_tokens` floor) allows.

    Keys: `stored_bytes`, `dense_bytes`, `ratio` (stored / dense), `target_bytes` and
    `target_ratio` (what the budget allows: `max(budget x dense, floor_tokens dense tokens)`
    per layer and row; the dense bytes without a budget), `floor_tokens`, `tokens_seen`,
    `tokens_packed`, `keep_groups`, `num_groups`, `recipe` (the table row a budget
    took its unset fields from, or None), `parts` (bytes by tensor name) and
    `per_layer` rows (bytes, dense bytes, ratio, K, bits, tokens stored and per KV head, wide
    tokens, and `below_floor`: the context is at most `floor_tokens`, held dense, exactly).
    """
    seen: set[tuple[str, int]] = set()
    parts: dict[str, int] = {}

    def count(name: str, tensor: torch.Tensor) -> int:
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if key in seen:
            return 0
        seen.add(key)
        nbytes = storage.nbytes()
        part = name.split(".", 2)[-1] if name.startswith("rows.") else name  # one part over the rows
        parts[part] = parts.get(part, 0) + nbytes
        return nbytes

    stored = dense = 0
    target = 0.0
    per_layer = []
    for layer in cache.layers:
        layer_bytes = sum(count(name, tensor) for name, tensor in layer.stored_tensors().items())
        layer_dense = layer.dense_bytes()
        per_layer.append(
            {
                "stored_bytes": layer_bytes,
                "dense_bytes": layer_dense,
                "ratio": layer_bytes / layer_dense if layer_dense else 0.0,
                **layer.summary(),
            }
        )
        stored += layer_bytes
        dense += layer_dense
        target += layer.target_bytes_held()
    first = per_layer[0] if per_layer else {}
    return {
        "stored_bytes": stored,
        "dense_bytes": dense,
        "ratio": stored / dense if dense else 0.0,
        "target_bytes": target,
        "target_ratio": target / dense if dense else 0.0,
        "floor_tokens": cache.config.floor_tokens,
        "tokens_seen": cache.layers[0].get_seq_length() if cache.layers else 0,
        "tokens_packed": first.get("tokens_stored", 0),
        "keep_groups": [row["keep_groups"] for row in per_layer],
        "num_groups": cache.config.num_groups,
        "recipe": _recipe_summary(getattr(cache, "recipe", None)),
        "parts": parts,
        "per_layer": per_layer,
    }


def _recipe_summary(recipe) -> dict | None:
    """`{"dtype", "budget", "candidate", "fields"}` of a recipe table row, or None."""
    if recipe is None:
        return None
    return {"dtype": recipe.dtype, "budget": recipe.budget, "candidate": recipe.candidate, "fields": dict(recipe.fields)}
