"""Pre-RoPE key bases to compare with a calibrated one, at equal bytes (issue 22).

From bases made by `hf-subtok calibrate --key-space pre_rope`, writes beside them the same
artifact with other key bases, so that `hf-subtok bench --methods subtok:key_bases=FOLDER`
measures what the calibration itself adds to keys stored before RoPE:

- `identity`: the key's own channels (RoPE undone, nothing else);
- `hadamard`: the Hadamard rotation the package applies after RoPE, applied before it;
- `pca-hadamard`: the calibrated basis followed by the Hadamard rotation (outliers of the
  principal coefficients spread again);
- `pca-uncentred`: the calibrated basis without the calibration mean.

Values' bases are left as calibrated (the cache does not read them).

    python benchmarks/key_bases_variants.py bench_out/bases/smollm2-pre-rope
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from hf_subtok.quant.rotation import hadamard
from hf_subtok.rank import RankBases

logger = logging.getLogger("key_bases_variants")


def variants(bases: RankBases) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Name -> (key basis `[L, Hkv, D, D]`, key mean `[L, Hkv, D]`)."""
    basis, mean = bases.tensors["key_basis"], bases.tensors["key_mean"]
    layers, heads, dim, _ = basis.shape
    rotation = hadamard(dim)
    zero = torch.zeros_like(mean)
    return {
        "identity": (torch.eye(dim).expand(layers, heads, dim, dim), zero),
        "hadamard": (rotation.expand(layers, heads, dim, dim), zero),
        "pca-hadamard": (basis @ rotation, mean),
        "pca-uncentred": (basis, zero),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bases", help="folder of bases calibrated with --key-space pre_rope")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    source = Path(args.bases)
    bases = RankBases.from_pretrained(str(source))
    if bases.config.key_space != "pre_rope":
        raise ValueError(f"{source} holds bases with key_space={bases.config.key_space!r}; pre_rope needed")
    for name, (basis, mean) in variants(bases).items():
        tensors = dict(bases.tensors, key_basis=basis.contiguous(), key_mean=mean.contiguous())
        folder = source.parent / f"{source.name}-{name}"
        RankBases(bases.config, tensors).save_pretrained(folder)
        logger.info("wrote %s", folder)


if __name__ == "__main__":
    main()
