"""Transfer studies: a grid of fine-tune -> evaluate -> compare -> probe cells and its aggregates.

:mod:`~cka_geo.study.config` (the TOML config, validated), :mod:`~cka_geo.study.grid`
(cells, stable ids, shards), :mod:`~cka_geo.study.run` (encoders, cells, resuming, devices),
:mod:`~cka_geo.study.aggregate` (tables, rankings, Kendall's tau, probing profiles, CKA
localisation) and :mod:`~cka_geo.study.figures`. ``cka-geo study CONFIG.toml`` runs it;
docs/study.md describes the config and the outputs. Nothing here is imported by
``import cka_geo``; scipy (extra ``study``) is imported by the aggregates only.
"""

from __future__ import annotations

from cka_geo.study.config import StudyConfig, load_config, parse_config
from cka_geo.study.grid import Cell, expand
from cka_geo.study.run import run_study

__all__ = ["Cell", "StudyConfig", "expand", "load_config", "parse_config", "run_study"]
