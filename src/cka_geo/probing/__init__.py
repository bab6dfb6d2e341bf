"""Layerwise linear probing: one closed-form ridge probe per sublayer, memory flat in samples.

:func:`probe_layers` runs every training batch once through the model with the capture path
(:func:`cka_geo.features.capture` + :func:`cka_geo.features.forward_batch`), so all chosen
sublayers are read in the same forward pass, and accumulates per layer, in float64, the
sufficient statistics of a least-squares fit — Σx, XᵀX, XᵀY, ΣY, Σ‖y‖² and the count — split
into ``cv_folds`` folds by image index (image ``i`` goes to fold ``i mod cv_folds``, with all
its rows when ``tokens`` pooling or time-series frames give several rows per image). No
feature matrix is kept: memory is O(folds · d²) per layer, whatever the number of samples.

The probe of a layer (see docs/probing.md):

* features standardised with the training mean and standard deviation (constant features get
  σ = 1 and thus drop out after centring);
* ridge regression with an unpenalised intercept,
  ``W = (ZᵀZ + λI)⁻¹ Zᵀ(Y − Ȳ)``, ``b = Ȳ``, Z the standardised training features, Y the
  targets (one-hot for classification: the "least-squares classifier", predicting the
  argmax of the scores);
* λ = α · n_fit, α chosen from :data:`ALPHAS` by ``cv_folds``-fold cross-validation on the
  training set: the α with the smallest summed held-out squared error (computed exactly from
  the fold statistics; ties go to the larger α), then refitted on the whole training set.

The test batches then run through the model once more (one pass per batch, every layer),
and each layer's probe is scored with the project's metrics
(:mod:`cka_geo.train.metrics`): accuracy and macro-F1 for classification, RMSE and R² for
regression. The best layer is the one with the highest accuracy (ties: macro-F1, then the
earlier layer) or R² (ties: lower RMSE, then the earlier layer); ``best_is_intermediate``
says whether it scores strictly better than the last layer probed (a tie with the last layer
is not an intermediate peak).

Example:
    >>> import torch
    >>> from cka_geo.models.vit import ViTConfig, VisionTransformer
    >>> m = VisionTransformer(ViTConfig(img_size=8, patch_size=4, in_chans=2, embed_dim=8,
    ...                                 depth=2, num_heads=1)).eval()
    >>> g = torch.Generator().manual_seed(0)
    >>> batches = [(torch.randn(16, 2, 8, 8, generator=g), torch.arange(16) % 2) for _ in range(2)]
    >>> res = probe_layers(m, batches, batches, task="classification")
    >>> [layer.name for layer in res.layers]
    ['blocks.0', 'blocks.1']
"""

from cka_geo.probing.layers import TASKS, probe_layers
from cka_geo.probing.result import LayerProbe, ProbeResult, plot_probe_depth, write_probe
from cka_geo.probing.ridge import (
    ALPHAS,
    RidgeFit,
    RidgeStats,
    fit_ridge,
    select_alpha,
    sse_from_stats,
)

__all__ = [
    "ALPHAS",
    "TASKS",
    "LayerProbe",
    "ProbeResult",
    "RidgeFit",
    "RidgeStats",
    "fit_ridge",
    "plot_probe_depth",
    "probe_layers",
    "select_alpha",
    "sse_from_stats",
    "write_probe",
]
