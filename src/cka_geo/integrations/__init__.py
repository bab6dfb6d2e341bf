"""Optional integrations with training frameworks.

* :mod:`cka_geo.integrations.torchmetrics`: :class:`CKAMetric`, a ``torchmetrics.Metric``
  (extra ``cka-geo[metrics]``).
* :mod:`cka_geo.integrations.lightning`: :class:`CKACallback`, a Lightning ``Callback``
  running :class:`cka_geo.monitor.CKAMonitor` (extra ``cka-geo[lightning]``).

Nothing is imported here: import the submodule you need (each imports its framework).
"""
