"""One way in: every command turns a `DivergenceConfig` (or a map reference) into a regulariser here.

`build_divergence(dcfg)` resolves, in this order, `map` (after substitution through `map_refs`):
a `models:/NAME@ALIAS`, `models:/NAME/VERSION` or `runs:/RUN_ID/PATH` URI (downloaded through
`tracking.download_map`), a map directory as a search logs it, or a `.safetensors` / `.json` map
file (any registered search space's format, through `spaces.load_space_map`); otherwise
`divergences.get(name, **params)`. It then applies the coefficient a saved map carries (a
`mixture` map searches lambda too; the config's `coef` otherwise) and `compile`, and returns a
`Regulariser` (divergence, lambda, estimator, chunk size, placement) the trainer takes as one
object.
`train`, `eval`, `compare`, the search's evaluator (`regulariser` for a candidate's divergence),
the preflight checks and the `maps` commands all call these functions.

This is the layer above the divergence library and MLflow: `mirrorlab.divergences` itself imports
no MLflow or config code.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from mirrorlab import divergences
from mirrorlab.config import ConfigError, DivergenceConfig
from mirrorlab.gbmpo import Regulariser
from mirrorlab.spaces import SavedMap, load_space_map
from mirrorlab.tracking import download_map

URI_SCHEMES = ("models:/", "runs:/")


def load_map(ref: str | Path, tracking_uri: str | None = None) -> SavedMap:
    """A saved map: a `models:/` or `runs:/` URI, a map directory, or a map file."""
    ref = str(ref)
    if ref.startswith(URI_SCHEMES):
        with tempfile.TemporaryDirectory() as d:
            return load_space_map(download_map(ref, d, tracking_uri))
    return load_space_map(Path(ref))


def regulariser(div: Any, dcfg: DivergenceConfig, coef: float | None = None) -> Regulariser:
    """`div` with the settings of `dcfg`: lambda (`coef` when given, e.g. a searched one, else
    `dcfg.coef`), estimator, chunk size, placement (loss or reward), and `compile`."""
    if dcfg.compile and div is not None:
        div.compile()
    return Regulariser(div, float(dcfg.coef if coef is None else coef), dcfg.estimator, dcfg.chunk_size,
                       dcfg.placement, dcfg.topk, dcfg.anchor, dcfg.anchor_every)


def resolve(dcfg: DivergenceConfig, *, map_refs: dict[str, str] | None = None,
            tracking_uri: str | None = None) -> tuple[divergences.Divergence, float | None]:
    """The divergence a `DivergenceConfig` names and the coefficient a saved map carries (None:
    use `dcfg.coef`), without applying `compile` (what preflight checks)."""
    if dcfg.map is None:
        return divergences.get(dcfg.name, **dcfg.params), None
    saved = load_map((map_refs or {}).get(dcfg.map, dcfg.map), tracking_uri=tracking_uri)
    return saved.divergence, saved.coef


def build_divergence(dcfg: DivergenceConfig, *, map_refs: dict[str, str] | None = None,
                     tracking_uri: str | None = None) -> Regulariser:
    """The regulariser a `DivergenceConfig` describes (see the module docstring)."""
    div, coef = resolve(dcfg, map_refs=map_refs, tracking_uri=tracking_uri)
    return regulariser(div, dcfg, coef)


def resolve_map_ref(ref: str, tracking_uri: str | None = None) -> divergences.Divergence:
    """A map reference of the `maps` commands as a divergence: anything `load_map` reads, a
    built-in divergence name (`kl_k3`, `prob_l2`, ...), or `random:SEED[:SCALE]` (the paper's
    random init). Bad references raise ConfigError saying what is accepted."""
    if ref.startswith("random:"):
        parts = ref.split(":")
        try:
            seed = int(parts[1])
            scale = float(parts[2]) if len(parts) > 2 else 0.01
        except (IndexError, ValueError):
            raise ConfigError(f"map {ref!r}: expected random:SEED or random:SEED:SCALE") from None
        return divergences.NeuralMirrorMap.random_init(seed, scale=scale)
    if ref in divergences.registry and not Path(ref).exists():
        return divergences.get(ref)
    if not ref.startswith(URI_SCHEMES) and not Path(ref).exists():
        raise ConfigError(f"map {ref!r}: no such file, and not a models:/ or runs:/ URI, a built-in "
                          f"divergence ({', '.join(divergences.names())}) or random:SEED")
    try:
        return load_map(ref, tracking_uri=tracking_uri).divergence
    except Exception as e:  # noqa: BLE001 - report any loading failure as a bad reference
        raise ConfigError(f"map {ref!r}: {e}") from None
