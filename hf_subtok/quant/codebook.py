"""Vector-quantized storage: pieces of a few channels, each the index of a codeword.

Scalar codes spend at least one bit per element; below that, an element can only be coded
together with its neighbours. Here each token `[N]` is scaled by one number (its RMS) and cut
into `N / d` pieces of `d` channels, and each piece is stored as the index of the nearest of
`W` codewords `[d]` that k-means fitted on the rows' own pieces: `log2(W) / d` bits per
element plus one scale per token (4 channels per 4-bit index: 1 bit per element).

Measured in the cache on SmolLM2-135M-Instruct (`value_codes=16`, every token kept, 2-bit keys
per channel, a 4-token dense window; BENCHMARKS.md "At 6% of the float32 bytes"): 23 of 24
needles at 6.4-6.9% of the fp32 bytes, +17.6% ppl; simulated with exact keys, such values
cost +4.4% ppl, and 1-bit scalar values lose needles that they keep.

The codebook has no token dim: each leading row (e.g. each (batch, KV head)) has its own
`[W, d]` words, which stay in place when tokens move (`take`, `first_tokens`, `cat` move
codes and scales only).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from hf_subtok.quant.bits import SUPPORTED_BITS, pack_bits, unpack_bits
from hf_subtok.quant.gather import take_rows
from hf_subtok.quant.logscale import LOG_SCALE_DTYPE, encode_log_scale, scale_values
from hf_subtok.quant.reference import default_scale_dtype
from hf_subtok.quant.tensor import SCALE_DTYPES, PackedCodes, check_one_device

KMEANS_STEPS = 15  # Lloyd steps after seeding (the distortion has stopped moving by then)
MAX_WORDS = 1 << max(SUPPORTED_BITS)
FIT_POINTS = 4096  # pieces per set k-means fits on, at most
CODE_CHUNK = 8192  # pieces per set coded at once (the distances are [sets, CODE_CHUNK, W] float32)


def code_bits(words: int) -> int:
    """Bits each code is stored in: the narrowest packable width (2, 4 or 8) that indexes
    `words` codewords. Raises `ValueError` unless `2 <= words <= 256`."""
    if isinstance(words, bool) or not isinstance(words, int) or not 2 <= words <= MAX_WORDS:
        raise ValueError(f"words must be an int in 2..{MAX_WORDS}, got {words!r}")
    return next(bits for bits in sorted(SUPPORTED_BITS) if words <= 1 << bits)


@dataclass(frozen=True)
class CodedTensor(PackedCodes):
    """A logical `[..., T, N]` float tensor as codeword indices: `x[..., t, p*d : (p+1)*d] ~=
    scale[..., t, 0] * codebook[..., code[..., t, p], :]`.

    Attributes:
        payload: `[..., T, (N / d) * bits / 8]` uint8, the indices packed along the last dim.
        scale: `[..., T, 1]`, one per token: the codebook's dtype, or uint8 logarithms
            (`quant.logscale`).
        codebook: `[..., W, d]` float16, bfloat16 or float32: each leading row's codewords.
        bits: 2, 4 or 8 per index (`code_bits(W)`).
    """

    payload: torch.Tensor
    scale: torch.Tensor
    codebook: torch.Tensor
    bits: int

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` unless the components fit together."""
        for name in ("payload", "scale", "codebook"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(getattr(self, name)).__name__}")
        if self.payload.dtype != torch.uint8:
            raise ValueError(f"payload must be torch.uint8, got {self.payload.dtype}")
        if self.codebook.dtype not in SCALE_DTYPES or self.scale.dtype not in (self.codebook.dtype, LOG_SCALE_DTYPE):
            raise ValueError(
                f"codebook must be one of {SCALE_DTYPES} and scale its dtype or {LOG_SCALE_DTYPE} (logarithms), "
                f"got {self.codebook.dtype} and {self.scale.dtype}"
            )
        if self.payload.dim() < 2 or self.codebook.dim() != self.payload.dim():
            raise ValueError(
                f"payload must be [..., T, P*bits/8] and codebook [..., W, d] with the same leading dims, got "
                f"{tuple(self.payload.shape)} and {tuple(self.codebook.shape)}"
            )
        words = self.codebook.shape[-2]
        if code_bits(words) != self.bits:
            raise ValueError(f"{words} codewords are stored in {code_bits(words)} bits, got bits={self.bits}")
        if (
            self.scale.shape != (*self.payload.shape[:-1], 1)
            or self.codebook.shape[:-2] != self.payload.shape[:-2]
        ):
            raise ValueError(
                f"scale must be [..., T, 1] and codebook [..., W, d] for payload {tuple(self.payload.shape)}, got "
                f"{tuple(self.scale.shape)} and {tuple(self.codebook.shape)}"
            )
        check_one_device(self.tensors())

    @property
    def piece(self) -> int:
        """Channels per codeword (d)."""
        return self.codebook.shape[-1]

    @property
    def shape(self) -> torch.Size:
        """The logical shape `[..., T, N]` (N = pieces x d)."""
        pieces = self.payload.shape[-1] * 8 // self.bits
        return torch.Size((*self.payload.shape[:-1], pieces * self.piece))

    def codes(self) -> torch.Tensor:
        """`[..., T, N / d]` int64 codeword indices."""
        return unpack_bits(self.payload, self.bits).long()

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The `[..., T, N]` tensor in `dtype` (computed in float32, then rounded once)."""
        *lead, tokens, channels = self.shape
        codes = self.codes().reshape(*lead, -1)  # [..., T * P]
        words = take_rows(self.codebook.float(), codes, dim=len(lead))  # [..., T * P, d]
        return words.view(*lead, tokens, channels).mul_(scale_values(self.scale)).to(dtype)

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> CodedTensor:
        """`fn` on every component; `fn` may only act on the dims before the token dim (batch
        reorders, device moves), which all components share."""
        return CodedTensor(fn(self.payload), fn(self.scale), fn(self.codebook), self.bits)

    def take(self, index: torch.Tensor) -> CodedTensor:
        """The tokens `index` (`[..., t]` int64 into the token dim, per leading row)."""
        dim = self.payload.dim() - 2
        return CodedTensor(
            take_rows(self.payload, index, dim), take_rows(self.scale, index, dim), self.codebook, self.bits
        )

    def slice_tokens(self, start: int, stop: int | None = None) -> CodedTensor:
        """Tokens `start:stop` (views; the codebook is shared)."""
        return CodedTensor(
            self.payload[..., start:stop, :], self.scale[..., start:stop, :], self.codebook, self.bits
        )

    def token_prefix(self, stop: int) -> CodedTensor:
        return self.slice_tokens(0, stop)

    def first_tokens(self, stop: int) -> CodedTensor:
        cut = self.slice_tokens(0, stop)
        return CodedTensor(cut.payload.clone(), cut.scale.clone(), self.codebook, self.bits)

    def flatten_heads(self) -> CodedTensor:
        raise ValueError("value groups stored as codeword indices keep a codebook per KV head: rows cannot be shared")

    @staticmethod
    def cat(tensors: Sequence[CodedTensor]) -> CodedTensor:
        """Concatenate along the token dim. Parts without tokens hold no codes and are left
        out (so an empty store takes the codebook of what is first added to it); the others
        must hold the same codebook."""
        for i, other in enumerate(tensors):
            if not isinstance(other, CodedTensor):
                raise ValueError(f"tensors[{i}] must be a CodedTensor, got {type(other).__name__}")
        dim = tensors[0].payload.dim() - 2
        held = [(i, t) for i, t in enumerate(tensors) if t.payload.shape[dim]] or [(0, tensors[0])]
        first = held[0][1]
        for i, other in held[1:]:
            if other.codebook is not first.codebook and not torch.equal(other.codebook, first.codebook):
                raise ValueError(f"tensors[{i}] is coded against another codebook than tensors[{held[0][0]}]")
        return CodedTensor(
            torch.cat([t.payload for _, t in held], dim),
            torch.cat([t.scale for _, t in held], dim),
            first.codebook,
            first.bits,
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored components by name, for memory accounting."""
        return {"payload": self.payload, "scale": self.scale, "codebook": self.codebook}


def fit_codebook(points: torch.Tensor, words: int, steps: int = KMEANS_STEPS) -> torch.Tensor:
    """`[R, W, d]` float32 k-means centroids of each of R sets of points `[R, n, d]`.

    Seeded by k-means++ from a fixed seed (deterministic), then `steps` Lloyd steps; a cluster
    left empty keeps its centroid. Every set needs at least one point. Of more than
    `FIT_POINTS` points a fixed random sample of that many is used: a 1k-token prompt of
    64-channel values in 4-channel pieces has 16k per head, and the fit then costs a quarter
    (measured on a CPU: 74 -> about 20 ms per layer of SmolLM2-135M). Not evenly spaced ones:
    with 16 pieces per token, a stride of 4 would only ever see 4 of the piece positions.
    """
    if points.dim() != 3 or points.shape[1] == 0:
        raise ValueError(f"points must be [R, n, d] with n >= 1, got {tuple(points.shape)}")
    code_bits(words)
    points = points.float()
    generator = torch.Generator(device=points.device).manual_seed(0)
    if points.shape[1] > FIT_POINTS:  # a fixed random sample: every piece position alike
        sample = torch.randperm(points.shape[1], generator=generator, device=points.device)[:FIT_POINTS]
        points = points[:, sample.sort().values]
    sets, n, dim = points.shape
    first = torch.randint(n, (sets, 1), generator=generator, device=points.device)
    centroids = torch.gather(points, 1, first.unsqueeze(-1).expand(sets, 1, dim))  # [R, 1, d]
    nearest_sq = (points - centroids).square().sum(-1)  # [R, n]
    for _ in range(words - 1):  # each next seed drawn with probability ~ squared distance
        weights = nearest_sq + (nearest_sq.sum(-1, keepdim=True) == 0)  # all seen: uniform
        pick = torch.multinomial(weights, 1, generator=generator)  # [R, 1]
        chosen = torch.gather(points, 1, pick.unsqueeze(-1).expand(sets, 1, dim))
        centroids = torch.cat([centroids, chosen], dim=1)
        nearest_sq = torch.minimum(nearest_sq, (points - chosen).square().sum(-1))
    ones = points.new_ones(sets, n)
    for _ in range(steps):
        nearest = nearest_words(points, centroids)  # [R, n]
        sums = torch.zeros_like(centroids).scatter_add_(1, nearest.unsqueeze(-1).expand(sets, n, dim), points)
        counts = points.new_zeros(sets, words).scatter_add_(1, nearest, ones).unsqueeze(-1)  # [R, W, 1]
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
    return centroids


def nearest_words(points: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """`[R, n]` int64 index of the codeword `[R, W, d]` nearest each point `[R, n, d]`
    (squared distance; the lowest index on a tie)."""
    distances = codebook.square().sum(-1).unsqueeze(1) - 2 * points @ codebook.transpose(-1, -2)  # [R, n, W]
    return distances.argmin(-1)


def quantize_vectors(
    x: torch.Tensor,
    words: int,
    piece: int,
    codebook: torch.Tensor | None = None,
    scale_dtype: torch.dtype | None = None,
    log_scale: bool = False,
) -> CodedTensor:
    """`x` `[..., T, N]` as codeword indices: each token scaled to unit RMS (its scale stored
    in `scale_dtype`), cut into pieces of `piece` channels, each coded by the nearest word of
    `codebook` `[..., W, d]` (of its leading row), or of a codebook fitted here by k-means on
    each leading row's own pieces (`fit_codebook`, then stored in `scale_dtype`).

    Args:
        x: `[..., T, N]` float32, float16 or bfloat16, e.g. values `[B, Hkv, T, D]` (with no
            tokens and no codebook, the codebook is zeros, one word's memory broadcast: there
            is nothing to fit, and an empty store holds no words).
        words: codewords per codebook, 2..256 (stored in `code_bits(words)` bits each).
        piece: channels per codeword; divides N, and `(N / piece) * bits` is a multiple of 8.
        codebook: `[..., words, piece]` to code against (e.g. the prompt's, for later tokens).
        scale_dtype: of scale and codebook; default `default_scale_dtype(x.dtype)`.
        log_scale: each token's scale as the nearest 8-bit logarithm (`quant.logscale`, one
            byte, within 4.5%) instead of in `scale_dtype`.
    """
    bits = code_bits(words)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError(f"x must be a floating point tensor [..., T, N], got {getattr(x, 'shape', type(x).__name__)}")
    *lead, tokens, channels = x.shape
    if isinstance(piece, bool) or not isinstance(piece, int) or piece < 1 or channels % piece:
        raise ValueError(f"piece must be a positive int dividing the last dim ({channels}), got {piece!r}")
    pieces = channels // piece
    if pieces * bits % 8:
        raise ValueError(
            f"{pieces} pieces of {piece} channels at {bits}-bit codes do not fill whole bytes; "
            f"the pieces per token must be a multiple of {8 // bits}"
        )
    scale_dtype = default_scale_dtype(x.dtype) if scale_dtype is None else scale_dtype
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got {scale_dtype}")
    source = x.float()
    rms = source.square().mean(-1, keepdim=True).sqrt_()  # [..., T, 1]
    scale = encode_log_scale(rms, round_up=False) if log_scale else rms.to(scale_dtype)
    stored = scale_values(scale)
    divisor = torch.where(stored == 0, torch.ones_like(stored), stored)
    rows = (source / divisor).reshape(math.prod(lead), tokens * pieces, piece)  # [R, T * P, d]
    if codebook is None and tokens == 0:  # nothing to fit: zero words holding no memory of their own
        codebook = torch.zeros(piece, dtype=scale_dtype, device=x.device).expand(*lead, words, piece)
    elif codebook is None:
        codebook = fit_codebook(rows, words).to(scale_dtype).reshape(*lead, words, piece)
    elif codebook.shape != (*lead, words, piece) or codebook.dtype != scale_dtype:
        raise ValueError(
            f"codebook must be {scale_dtype} {(*lead, words, piece)}, got {codebook.dtype} {tuple(codebook.shape)}"
        )
    book = codebook.float().reshape(math.prod(lead), words, piece)
    codes = torch.cat(  # a chunk of pieces at a time: the distances are [R, chunk, W]
        [nearest_words(rows[:, start : start + CODE_CHUNK], book) for start in range(0, rows.shape[1], CODE_CHUNK)]
        or [rows.new_empty(rows.shape[0], 0, dtype=torch.long)],
        dim=1,
    )  # [R, T * P]
    codes = codes.to(torch.uint8).reshape(*lead, tokens, pieces)
    return CodedTensor(pack_bits(codes, bits), scale, codebook, bits)
