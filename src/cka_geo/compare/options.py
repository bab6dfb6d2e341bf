"""The options of a comparison, their limits, and the device they name."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cka_geo.errors import UsageError
from cka_geo.functional import DEFAULT_RBF_FRAC, Estimator, Kernel, check_kernel, min_samples
from cka_geo.sublayers import DEFAULT_KINDS, KINDS, POOLINGS

#: The vocabulary's names under their older compare-module aliases.
SUBLAYER_KINDS = KINDS
DEFAULT_SUBLAYERS = DEFAULT_KINDS
DEFAULT_SAMPLES = 512
#: The numerical noise of CKA: the engine's stated accuracy against a float64 reference
#: (float32 grams). A CKA above ``1 - UNCHANGED_TOL`` counts as unchanged, and no verdict
#: ("most changed", "first to move", "largest own change") is drawn from a smaller change.
UNCHANGED_TOL = 1e-6
#: The RBF bandwidth fractions accepted: sigma = frac * median pairwise distance. Below 0.1
#: the gram of high-dimensional features is numerically the identity; above 10 its
#: structure is below float32 resolution (Kornblith et al. use 0.2-0.8).
RBF_FRAC_RANGE = (0.1, 10.0)
#: Most bootstrap replicates (beyond this the percentile interval does not move).
MAX_BOOTSTRAP = 100_000
#: Fewest batches for which a bootstrap interval over batches is worth its name.
MIN_INTERVAL_BATCHES = 10
#: Interval methods over batches (cka_geo.bootstrap): jackknife-t (default; nominal coverage
#: from 6 batches on in benchmarks/bench_intervals.py), the percentile bootstrap, or none.
INTERVALS = ("jackknife-t", "percentile", "none")
_OWN = "{}#own"
#: Dtypes the forwards of a comparison may run in (``--forward-precision``).
FORWARD_PRECISIONS = ("float32", "bf16")


@dataclass
class CompareOptions:
    """Settings of a comparison (all recorded in the results).

    Attributes:
        data: None for the embedded Sentinel-2 probe set (sized to the model's bands and
            image size), a folder of .tif/.npy images, or a .npy/.pt array (N, C, H, W) or
            image time series (N, T, C, H, W) (see ``time_mode``).
        sublayers: Sublayer kinds among attn, fc1, act, fc2, block.
        names: Explicit canonical names instead of kinds (order kept).
        kernel: ``"linear"`` or ``"rbf"``.
        rbf_frac: RBF bandwidth fraction of the median pairwise distance.
        estimator: ``"unbiased"`` (minibatch HSIC_1, Nguyen et al. 2021) or ``"biased"``
            (full-batch CKA of Kornblith et al. 2019: every sample in one batch; memory
            grows with samples, so for small N).
        pooling: ``"mean"`` (patch tokens), ``"cls"``, ``"flatten"`` or ``"tokens"``.
        samples: Probe images to use (default: all of user data; embedded: 512 on CPU,
            2048 on CUDA, capped by the scene's distinct crops at the image size and cut to
            whole batches; more than the distinct crops overlap them, with a warning).
        batch_size: Images per batch, the unit of the bootstrap (default: 32 on CPU, 128
            on CUDA, smaller where that leaves fewer than 10 batches).
        image_size: Pixels, N or (height, width), at which the models see the probes
            (default: the size of ``data``; embedded: on CPU ``min(checkpoint's, 224)`` per
            side rounded down to the patch multiple, on CUDA the checkpoint's, smaller where
            the scene holds fewer than 40 distinct crops); another size than the
            checkpoint's resamples its position embedding by the family's rule.
        bands: Sentinel-2 band names to feed (``("B04", "B03", "B02")``), chosen from the
            embedded scene or from ``data`` with a conventional band order.
        normalize: ``auto``, ``none``, ``imagenet``, ``s2-div10000`` (``ssl4eo``),
            ``scene`` or a mean/std .json file (:mod:`cka_geo.data.normalize`).
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        seed: Seed of the embedded probe crops and of the bootstrap.
        time_mode: For time-series input: ``"frames"`` (each frame an example: N·T rows)
            or ``"mean"`` (features averaged over time: N rows).
        trust: Allow pickle code in checkpoint files (only for files you trust).
        prefix: Encoder prefix override for both files.
        num_heads: Attention heads when not stored in the files (default width / 64).
        norm_eps: LayerNorm epsilon, overriding what the files store or the family's known
            value (else 1e-6, assumed with a warning).
        act: MLP activation (``gelu``, ``gelu_tanh``, ``quick_gelu``, ``silu``), likewise.
        wavelengths: DOFA only: the input bands' wavelengths in µm or band names (default:
            band names stored in the file, else the 13 Sentinel-2 L1C bands).
        own_change: Also compute each sublayer's own change.
        own_kinds: The sublayer kinds whose own change is computed (None: every compared
            kind). Each costs what its fine-tuned module costs on the pretrained input: the
            ``block`` view runs every fine-tuned block again, at most one more forward of the
            fine-tuned model; ``attn``, ``fc1``, ``fc2`` together about as much again.
        bootstrap: Replicates of the percentile bootstrap (0: no intervals at all).
        confidence: Level of the intervals.
        interval: ``"jackknife-t"`` (default: delete-one-batch jackknife standard error with
            a Student t quantile on batches - 1 dof), ``"percentile"`` (the percentile
            bootstrap) or ``"none"``; see :mod:`cka_geo.bootstrap` for their coverage.
        forward_precision: ``"float32"`` (default) or ``"bf16"``: the forwards under bf16
            autocast (faster on GPUs with bf16 units); the features are pooled in float32
            and the grams and sums stay float32/float64. Its error against float32
            forwards is stated in docs/distributed.md.
        progress: None (default): the plan line, then a progress bar on a terminal or
            plain lines (estimated total after the first batch, then every 10 % or 30 s)
            on any other stderr; True likewise; False: nothing on stderr.
    """

    data: str | None = None
    sublayers: tuple[str, ...] = DEFAULT_SUBLAYERS
    names: tuple[str, ...] | None = None
    kernel: Kernel = "linear"
    rbf_frac: float = DEFAULT_RBF_FRAC
    estimator: Estimator = "unbiased"
    pooling: str = "mean"
    samples: int | None = None
    batch_size: int | None = None
    device: str = "auto"
    seed: int = 0
    time_mode: str = "frames"
    trust: bool = False
    prefix: str | None = None
    num_heads: int | None = None
    norm_eps: float | None = None
    act: str | None = None
    wavelengths: tuple[float | str, ...] | None = None
    own_change: bool = True
    own_kinds: tuple[str, ...] | None = None
    bootstrap: int = 1000
    confidence: float = 0.95
    interval: str = "jackknife-t"
    progress: bool | None = None
    image_size: int | tuple[int, int] | None = None
    bands: tuple[str, ...] | None = None
    normalize: str = "auto"
    forward_precision: str = "float32"

    def validate(self) -> None:
        """Raise UsageError naming the first bad option."""
        check_kernel(self.kernel, self.estimator)
        bad = [s for s in self.sublayers if s not in SUBLAYER_KINDS]
        if bad or not self.sublayers:
            raise UsageError(f"unknown sublayer {bad[0] if bad else '(none)'!r}; choose from {', '.join(SUBLAYER_KINDS)}")
        if self.own_kinds is not None:
            allowed = SUBLAYER_KINDS if self.names else self.sublayers
            bad = [k for k in self.own_kinds if k not in allowed]
            if bad or not self.own_kinds:
                raise UsageError(
                    f"--own-change: {bad[0] if bad else '(none)'!r} is not among the compared sublayers "
                    f"({', '.join(allowed)}); --no-own-change for none"
                )
        if self.pooling not in POOLINGS:
            raise UsageError(f"unknown pooling {self.pooling!r}; choose from {', '.join(POOLINGS)}")
        if self.samples is not None and self.samples < min_samples(self.estimator):
            raise UsageError(f"--samples must be at least {min_samples(self.estimator)}, got {self.samples}")
        if self.batch_size is not None and self.batch_size < min_samples(self.estimator):
            raise UsageError(f"--batch-size must be at least {min_samples(self.estimator)}, got {self.batch_size}")
        lo, hi = RBF_FRAC_RANGE
        if self.kernel == "rbf" and not lo <= self.rbf_frac <= hi:
            raise UsageError(
                f"--rbf-frac must be in [{lo:g}, {hi:g}] (sigma as a fraction of the median pairwise "
                f"distance; 0.2-0.8 are usual), got {self.rbf_frac:g}"
            )
        if not 0 < self.confidence < 1:
            raise UsageError(f"--confidence must be in (0, 1), got {self.confidence}")
        if self.interval not in INTERVALS:
            raise UsageError(f"unknown --interval {self.interval!r}; choose from {', '.join(INTERVALS)}")
        if not 0 <= self.bootstrap <= MAX_BOOTSTRAP:
            raise UsageError(f"--bootstrap must be in [0, {MAX_BOOTSTRAP}], got {self.bootstrap}")
        if not 0 <= self.seed < 2**32:
            raise UsageError(f"--seed must be in [0, 2**32 - 1], got {self.seed}")
        from cka_geo.compare.inputs import parse_size
        from cka_geo.data.normalize import check_preset

        parse_size(self.image_size)
        check_preset(self.normalize)
        if self.forward_precision not in FORWARD_PRECISIONS:
            raise UsageError(f"--forward-precision {self.forward_precision!r}: choose from {', '.join(FORWARD_PRECISIONS)}")
        if self.bands is not None and not self.bands:
            raise UsageError("--bands needs at least one band name")


def own_names(names: list[str], opts: CompareOptions) -> list[str]:
    """The sublayers whose own change is computed, in ``names`` order (none without
    ``opts.own_change``; explicit ``names`` all, unless ``own_kinds`` chooses)."""
    if not opts.own_change:
        return []
    if opts.own_kinds is None:
        return list(names)
    from cka_geo.sublayers import kind_of

    return [n for n in names if kind_of(n) in opts.own_kinds]


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; refuse unsupported or absent devices.

    The one resolver of every command: :func:`cka_geo.devices.resolve_device`.
    """
    from cka_geo.devices import resolve_device as resolve

    return resolve(device)
