"""`train_router`: distil a learned router (+ LoRA) for one base model, with checkpoints and a held-out eval."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from hf_subtok.routers import (
    LoraWeights,
    RouterAdapter,
    RouterConfig,
    RouterModules,
    model_identity,
)
from hf_subtok.training.checkpoint import load_checkpoint, save_checkpoint
from hf_subtok.training.data import TokenWindows, read_training_text
from hf_subtok.training.distill import MaskSpec, kl_to_teacher, student_logits, teacher_mode
from hf_subtok.training.evaluate import EvalConfig, eval_cases, evaluate
from hf_subtok.training.selector import (
    attention_modules,
    capture_queries,
    roped_queries,
    selector_loss,
)

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
ROUTER_DIR = "router"
# settings a resumed run must share with the checkpoint it continues
RESUME_KEYS = (
    "model",
    "text",
    "seq_len",
    "eval_len",
    "dense_window",
    "num_groups",
    "keep_groups",
    "budget",
    "lora_r",
    "lora_alpha",
    "lora_targets",
    "router_hidden",
    "selector",
    "selector_hidden",
    "seed",
    "batch_size",
    "obs_window",
    "grad_through_prefix",
    "selector_layers",
)


@dataclass
class TrainConfig:
    """Settings of `hf-subtok train-router`.

    Defaults, for SmolLM2-135M on 2 CPU cores: 100 steps or 15 minutes of training, whichever
    comes first (about 9 minutes on a quiet machine), then a held-out evaluation of 1-5 minutes.
    """

    model: str | None = field(
        default=None, metadata={"help": "model id or folder (None: embedded SmolLM2-135M)"}
    )
    text: str | None = field(
        default=None, metadata={"help": "training text file (None: the shipped haystack text)"}
    )
    out: str = field(
        default="router-out", metadata={"help": "output folder: checkpoint/, router/, eval.json"}
    )
    steps: int = field(
        default=100, metadata={"help": "optimizer steps (training also stops at max_minutes)"}
    )
    max_minutes: float = field(
        default=15.0, metadata={"help": "stop training after this wall time (then evaluate)"}
    )
    seq_len: int = field(
        default=256, metadata={"help": "tokens per training window (prefix + scored tail)"}
    )
    eval_len: int = field(
        default=64, metadata={"help": "scored tail of each window (KL positions)"}
    )
    dense_window: int = field(
        default=32, metadata={"help": "newest prefix tokens kept whole in training"}
    )
    num_groups: int = field(default=8, metadata={"help": "value groups per head (G)"})
    budget: float = field(
        default=0.65, metadata={"help": "stored/dense byte ratio; sets K (groups kept)"}
    )
    keep_groups: int | None = field(
        default=None, metadata={"help": "K, overriding the one the budget gives"}
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (0: train the router alone)"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    lora_targets: tuple[str, ...] = field(
        default=("q_proj", "v_proj", "o_proj"), metadata={"help": "LoRA modules"}
    )
    router_hidden: int = field(default=32, metadata={"help": "group router MLP width"})
    selector: bool = field(
        default=True, metadata={"help": "also train the query-aware token selector"}
    )
    selector_hidden: int = field(default=16, metadata={"help": "token selector MLP width"})
    obs_window: int = field(default=32, metadata={"help": "prompt queries the selector observes"})
    selector_layers: int = field(
        default=6, metadata={"help": "layers whose selector trains per step (rotating)"}
    )
    lr: float = field(default=1e-3, metadata={"help": "LoRA learning rate"})
    router_lr: float = field(default=1e-3, metadata={"help": "group router learning rate"})
    selector_lr: float = field(default=3e-3, metadata={"help": "token selector learning rate"})
    temperature: float = field(default=0.5, metadata={"help": "straight-through top-k relaxation"})
    grad_through_prefix: bool = field(
        default=False, metadata={"help": "also backpropagate through the prefix's forward (slower)"}
    )
    batch_size: int = field(default=1, metadata={"help": "windows per step"})
    checkpoint_every: int = field(default=20, metadata={"help": "steps between checkpoints"})
    seed: int = field(default=0, metadata={"help": "data order and initialisation"})
    evaluate: bool = field(
        default=True, metadata={"help": "run the held-out evaluation at the end"}
    )
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(evict_budget=0.3))

    def __post_init__(self) -> None:
        for name, low in (
            ("steps", 1),
            ("seq_len", 8),
            ("eval_len", 2),
            ("dense_window", 0),
            ("num_groups", 1),
            ("lora_r", 0),
            ("lora_alpha", 1),
            ("router_hidden", 1),
            ("selector_hidden", 1),
            ("obs_window", 1),
            ("selector_layers", 1),
            ("batch_size", 1),
            ("checkpoint_every", 1),
            ("seed", 0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name in ("max_minutes", "lr", "router_lr", "selector_lr", "temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
        if not 0 < self.budget <= 1:
            raise ValueError(f"budget must be in (0, 1], got {self.budget!r}")
        prefix = self.seq_len - self.eval_len
        if prefix <= self.dense_window + 4:
            raise ValueError(
                f"seq_len - eval_len = {prefix} must exceed dense_window + 4 = {self.dense_window + 4} "
                "(no prefix token would lose value groups)"
            )
        if self.selector and prefix <= self.obs_window + 8:
            raise ValueError(
                f"seq_len - eval_len = {prefix} must exceed obs_window + 8 = {self.obs_window + 8}"
            )
        self.lora_targets = tuple(self.lora_targets)

    @property
    def prefix_len(self) -> int:
        return self.seq_len - self.eval_len

    def resume_settings(self) -> dict:
        return {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in asdict(self).items()
            if k in RESUME_KEYS
        }


def resolve_keep_groups(config: TrainConfig, model) -> int:
    """K from `keep_groups`, else the most groups `budget` pays for with whole keys (no eviction)."""
    from hf_subtok import SubTokenConfig

    cache_config = SubTokenConfig(
        num_groups=config.num_groups,
        keep_groups=config.keep_groups,
        budget=config.budget,
        axes="groups",
    )
    head_dim = model_identity(model)["head_dim"]
    return cache_config.resolve_keep_groups(head_dim, model.dtype.itemsize)


def _wrap_lora(model, config: TrainConfig):
    """`model` with trainable LoRA layers (peft), or `model` itself with `lora_r=0`."""
    for p in model.parameters():
        p.requires_grad_(False)
    if not config.lora_r:
        return model
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError(
            "train-router with LoRA needs peft: pip install 'hf-subtok[train]'"
        ) from e
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=list(config.lora_targets),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def _lora_weights(peft_model) -> LoraWeights:
    """The trained adapter exactly as `PeftModel.save_pretrained` writes it."""
    with tempfile.TemporaryDirectory(prefix="hf-subtok-lora-") as tmp:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        return LoraWeights.load(Path(tmp))


def _step_loss(
    model, modules: RouterModules, ids: torch.Tensor, spec: MaskSpec, config: TrainConfig, step: int
):
    """`(kl, selector_loss)` of one batch; the selector loss is 0 without a selector."""
    from transformers import DynamicCache

    teacher_cache = DynamicCache()
    with torch.no_grad(), teacher_mode(model), capture_queries(model) as records:
        teacher = model(
            input_ids=ids,
            past_key_values=teacher_cache,
            use_cache=True,
            logits_to_keep=config.eval_len,
        )
    kl = kl_to_teacher(teacher.logits, student_logits(model, modules.groups, ids, spec))
    sel = torch.zeros((), dtype=torch.float32)
    if modules.selectors is not None:
        layers = list(
            zip(
                attention_modules(model),
                records,
                teacher_cache.layers,
                modules.selectors,
                strict=True,
            )
        )
        count = min(config.selector_layers, len(layers))
        for j in range(count):  # a rotating subset of layers per step: every layer gets its turn
            module, record, layer, selector = layers[(step * count + j) % len(layers)]
            with torch.no_grad():
                queries = roped_queries(module, record)  # [B, Hq, T, D]
            sel = sel + selector_loss(
                selector,
                layer.keys,
                layer.values,
                queries,
                module.scaling,
                config.prefix_len,
                config.obs_window,
            )
        sel = sel / count
    return kl, sel


def train_router(config: TrainConfig, *, resume: bool = False, model=None, tokenizer=None) -> dict:
    """Train, checkpoint, evaluate and save a router; returns a summary (paths, losses, metrics).

    `model`/`tokenizer` default to `load_model_and_tokenizer(config.model)`. With `resume`,
    training continues from `<out>/checkpoint` (same settings required).
    """
    from tqdm.auto import tqdm

    out = Path(config.out)
    checkpoint = out / CHECKPOINT_DIR
    if checkpoint.exists() and not resume:
        raise ValueError(
            f"out={str(out)!r} already holds a checkpoint; pass --resume to continue it or use another --out"
        )
    # read before the model loads: a bad path fails fast
    text, source = read_training_text(config.text)
    if model is None:
        from hf_subtok.model_loading import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(config.model)
    model.eval()
    keep_groups = resolve_keep_groups(config, model)
    token_ids = tokenizer(text, add_special_tokens=False, verbose=False).input_ids
    windows = TokenWindows(token_ids, config.seq_len, config.batch_size, config.seed)
    router_config = RouterConfig.for_model(
        model,
        num_groups=config.num_groups,
        keep_groups=keep_groups,
        budget=config.budget,
        router_hidden=config.router_hidden,
        selector=config.selector,
        selector_hidden=config.selector_hidden,
        lora_r=config.lora_r,
    )
    torch.manual_seed(config.seed)
    modules = RouterModules.from_config(router_config).train()
    student = _wrap_lora(model, config)
    params = {f"router.{n}": p for n, p in modules.named_parameters()}
    lora_params = {f"lora.{n}": p for n, p in student.named_parameters() if p.requires_grad}
    groups = [{"params": list(modules.groups.parameters()), "lr": config.router_lr}]
    if modules.selectors is not None:
        groups.append({"params": list(modules.selectors.parameters()), "lr": config.selector_lr})
    if lora_params:
        groups.append({"params": list(lora_params.values()), "lr": config.lr})
    params.update(lora_params)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    spec = MaskSpec(
        config.prefix_len,
        config.dense_window,
        config.num_groups,
        keep_groups,
        config.temperature,
        config.grad_through_prefix,
    )

    start_step, elapsed, history = 0, 0.0, []
    if resume and checkpoint.exists():
        meta = load_checkpoint(checkpoint, params=params, optimizer=optimizer)
        if meta.get("settings") != config.resume_settings():
            changed = sorted(
                k
                for k in config.resume_settings()
                if meta.get("settings", {}).get(k) != config.resume_settings()[k]
            )
            raise ValueError(
                f"cannot resume {checkpoint}: settings {changed} differ from the checkpoint's"
            )
        start_step, elapsed, history = meta["step"], meta["elapsed_s"], meta["history"]
        logger.info("Resuming from step %d (%.1f min trained)", start_step, elapsed / 60)
    elif resume:
        logger.warning("No checkpoint in %s; starting from step 0", out)

    logger.info(
        "Training a router for %s: K=%d of G=%d value groups (budget %.3f), %s LoRA r=%d, on %s (%d tokens)",
        router_config.base_model,
        keep_groups,
        config.num_groups,
        config.budget,
        "with" if config.lora_r else "without",
        config.lora_r,
        source,
        len(token_ids),
    )
    step = start_step
    began = time.perf_counter() - elapsed
    with tqdm(
        total=config.steps, initial=start_step, desc="hf-subtok train-router", unit="step"
    ) as bar:
        while step < config.steps:
            if time.perf_counter() - began > 60 * config.max_minutes:
                logger.warning(
                    "Stopping at step %d: max_minutes=%g reached", step, config.max_minutes
                )
                break
            kl, sel = _step_loss(student, modules, windows.batch(step), spec, config, step)
            (kl + sel).backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            history.append(
                {"step": step, "kl": round(kl.item(), 6), "selector": round(sel.item(), 6)}
            )
            bar.set_postfix(kl=f"{kl.item():.4f}", sel=f"{sel.item():.3f}")
            bar.update()
            if step % config.checkpoint_every == 0 or step == config.steps:
                meta = {
                    "settings": config.resume_settings(),
                    "elapsed_s": time.perf_counter() - began,
                    "history": history,
                }
                save_checkpoint(
                    checkpoint, step=step, params=params, optimizer=optimizer, meta=meta
                )
    train_seconds = time.perf_counter() - began

    lora = _lora_weights(student) if config.lora_r else None
    base_model = student.unload() if config.lora_r else student
    modules.eval()
    router_config.training = {
        "text": source,
        "steps": step,
        "train_minutes": round(train_seconds / 60, 2),
        "seq_len": config.seq_len,
        "scored_tail": config.eval_len,
        "dense_window": config.dense_window,
        "grad_through_prefix": config.grad_through_prefix,
        "lora_targets": list(config.lora_targets),
        "lora_r": config.lora_r,
        "lr": config.lr,
        "router_lr": config.router_lr,
        "selector_lr": config.selector_lr,
        "final_kl": _recent_mean(history, "kl"),
        "first_kl": _first_mean(history, "kl"),
    }
    adapter = RouterAdapter(router_config, modules, lora)
    summary = {"steps": step, "train_seconds": train_seconds, "history": history}
    if config.evaluate:
        with tqdm(
            total=eval_cases(config.eval), desc="hf-subtok held-out eval", unit="case"
        ) as bar:
            metrics = evaluate(base_model, tokenizer, adapter, config.eval, progress=bar)
        router_config.metrics = metrics
        summary["metrics"] = metrics
        (out / "eval.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    adapter.save_pretrained(out / ROUTER_DIR)
    summary["router_dir"] = str(out / ROUTER_DIR)
    return summary


def _recent_mean(history: list[dict], key: str, n: int = 10) -> float | None:
    values = [h[key] for h in history[-n:]]
    return round(sum(values) / len(values), 6) if values else None


def _first_mean(history: list[dict], key: str, n: int = 10) -> float | None:
    values = [h[key] for h in history[:n]]
    return round(sum(values) / len(values), 6) if values else None


def config_fields() -> list[str]:
    """Names of the `TrainConfig` fields (for the CLI)."""
    return [f.name for f in fields(TrainConfig)]
