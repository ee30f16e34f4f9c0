"""Run one measurement in a freshly spawned Python process, so nothing an earlier method did
(allocator caches, resident pages, lazily built kernels) counts toward the next one.

`run_fresh(fn, *args)` spawns an interpreter (not a fork: nothing is inherited but the
arguments), gives it the caller's torch thread count and log level, runs `fn(*args)` there and
returns its result. `fn` and its arguments must be picklable (a module-level function).
`load_model` loads a model inside such a process and pages its weights in, so the
measurement that follows sees the weights as already resident.
"""

from __future__ import annotations

import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import torch


def run_fresh(fn, *args):
    """`fn(*args)` in a new spawned process; its return value (or its exception) comes back."""
    context = multiprocessing.get_context("spawn")
    level = logging.getLogger().getEffectiveLevel()
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_call, fn, torch.get_num_threads(), level, args).result()


def _call(fn, threads: int, log_level: int, args: tuple):
    torch.set_num_threads(threads)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return fn(*args)


def load_model(model_name: str | None, dtype: str, device: str = "cpu", *, kvpress: bool = False,
               architecture: str | None = None):
    """`(model, tokenizer)` loaded by name in `dtype` on `device` (in the `architecture` class,
    see `load_model_and_tokenizer`), weights paged in.

    With `kvpress`, kvpress is imported first (before any `SubTokenCache` registers its
    attention; see `kvpress_methods.import_kvpress`).
    """
    if kvpress:
        from hf_subtok.bench.kvpress_methods import import_kvpress

        import_kvpress()
    from hf_subtok.model_loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(model_name, dtype=getattr(torch, dtype), device=device,
                                                architecture=architecture)
    with torch.no_grad():  # page the (memory-mapped) weights in before anything is measured
        model(input_ids=torch.ones(1, 8, dtype=torch.long, device=device), use_cache=False, logits_to_keep=1)
    return model, tokenizer
