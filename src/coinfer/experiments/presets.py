"""Method presets: the table of method variants an experiment can run.

A preset is one line of :data:`PRESETS`: the encoder it runs (an entry of
:data:`coinfer.encoders.METHODS`), the options it fixes, and its grid *axes*,
each an encoder option whose values are taken from a config field. A run
builds one variant per point of the grid (first axis outermost) and then picks
the family's hyper-parameters on validation. The axis ``calibration`` is not
an option: it is how many of the calibration inputs the encoder is given.

Adding a variant is one line, for instance::

    "coin-sampled-eps": Preset("coin", {"estimator": "sampled"}, {"eps": "coin_eps"}, "..."),
    "heads-coin": Preset("heads", {"trunk": "coin", "refit": True},
                         axes={"split": "heads_splits", "num_samples": "calibration_sizes"}),

Option values may be :class:`Ref` placeholders, filled in when the run builds
the variant: :data:`SEED`, :data:`PROGRESS`, :data:`BASE` (the common
initialisation), :data:`POOL` (the pool's inputs), :data:`BUFFERS`
(``"recompute"`` for a model with BatchNorm, else ``"average"``) and
``cfg("field")`` (a config field's value). Every encoder that declares
``seed``, ``progress`` or ``backend`` gets the run's seed, progress flag and
the config's ``fisher_backend`` unless its preset sets them.

Controls (``base``, ``substitute``, ``default``) are presets marked
``control=True``; :data:`CONTROLS` says what each does.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from coinfer.code import Code
from coinfer.encoders import METHODS, encode
from coinfer.errors import CoinferError
from coinfer.experiments.evaluate import default_estimates, substitute_estimates

if TYPE_CHECKING:
    from coinfer.experiments.config import ExperimentConfig

__all__ = [
    "Preset",
    "PRESETS",
    "DEFAULT_METHODS",
    "CONTROLS",
    "Ref",
    "SEED",
    "PROGRESS",
    "BASE",
    "POOL",
    "BUFFERS",
    "cfg",
    "Variant",
    "BuildContext",
    "build_variants",
    "check_presets",
]


# --------------------------------------------------------------------------- placeholders
@dataclass(frozen=True)
class Ref:
    """A value known only when a run builds its variants (see the module docstring)."""

    what: str
    field: str | None = None

    def __repr__(self) -> str:
        return f"cfg({self.field!r})" if self.what == "config" else self.what.upper()


SEED = Ref("seed")
PROGRESS = Ref("progress")
BASE = Ref("base")
POOL = Ref("pool")
BUFFERS = Ref("buffers")


def cfg(field_name: str) -> Ref:
    """The value of config field ``field_name``."""
    return Ref("config", field_name)


#: Options an encoder gets from the run when it declares them and its preset does not set them.
_FROM_RUN: dict[str, Any] = {"seed": SEED, "progress": PROGRESS, "backend": cfg("fisher_backend")}

#: Grids derived from the config, usable as axis sources beside the config's own list fields.
#: An empty grid drops the axis (the variant then neither shows nor records it).
_DERIVED: dict[str, Callable[[ExperimentConfig, bool], list]] = {
    "max_calibration": lambda c, has_bn: [max(c.calibration_sizes)],
    "max_calibration_if_bn": lambda c, has_bn: [max(c.calibration_sizes)] if has_bn else [],
}

#: How an axis value is written in a variant's label (default ``name=value``).
_LABEL = {"calibration": "n={}", "num_samples": "n={}", "epochs": "E={}", "eps": "eps={:g}"}
#: Axes shown in the label only when their grid has more than one value.
_QUIET_WHEN_SINGLE = {"eps"}


# --------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Preset:
    """One method variant family: encoder, fixed options, grid axes, description."""

    method: str  #: an encoder in coinfer.encoders.METHODS, or a control in CONTROLS
    options: Mapping[str, Any] = field(default_factory=dict)  #: fixed options (values may be Refs)
    axes: Mapping[str, str] = field(default_factory=dict)  #: option (or "calibration") -> config field
    description: str = ""
    control: bool = False  #: a control (no learned parity), not a coding method


_N_EPS = {"calibration": "calibration_sizes", "eps": "coin_eps"}
_DISTILL = {"lr": cfg("distill_lr"), "batch_size": cfg("distill_batch_size")}
_COIN_EXACT = {"estimator": "exact", "seed": SEED, "backend": cfg("fisher_backend"), "progress": PROGRESS}
_COIN_DISTILL = {"calibration": "max_calibration", "epochs": "coin_distill_epochs"}
_HEADS = {"split": "heads_splits", "calibration": "calibration_sizes"}

# fmt: off
#: Method families an experiment can run (``ExperimentConfig.methods``).
PRESETS: dict[str, Preset] = {
    "coin-exact": Preset("coin", {"estimator": "exact"}, _N_EPS, "COIN, exact Fisher"),
    "coin-sampled": Preset("coin", {"estimator": "sampled"}, _N_EPS, "COIN, sampled Fisher (y ~ p)"),
    "coin-empirical": Preset("coin", {"estimator": "empirical"}, _N_EPS, "COIN, empirical Fisher (true labels)"),
    "coin-exact-norm": Preset("coin", {"estimator": "exact", "normalize": True}, _N_EPS,
                              "COIN, exact Fisher, per-model Fisher normalised"),
    "coin-sampled-norm": Preset("coin", {"estimator": "sampled", "normalize": True}, _N_EPS,
                                "COIN, sampled Fisher, normalised"),
    "coin-empirical-norm": Preset("coin", {"estimator": "empirical", "normalize": True}, _N_EPS,
                                  "COIN, empirical Fisher, normalised"),
    "average": Preset("average", {"buffers": BUFFERS}, {"calibration": "max_calibration_if_bn"},
                      "w-weighted parameter average"),
    "distill-common": Preset("distill", {**_DISTILL, "init": BASE, "train_inputs": POOL},
                             {"epochs": "distill_epochs"},
                             "learned parity from the common init, on the pool's inputs"),
    "distill-random": Preset("distill", {**_DISTILL, "init": "random", "train_inputs": POOL},
                             {"epochs": "distill_epochs"},
                             "learned parity from a random init (ParM), on the pool's inputs"),
    "distill-calib": Preset("distill", {**_DISTILL, "init": BASE},
                            {"calibration": "calibration_sizes", "epochs": "distill_epochs"},
                            "learned parity from the common init, calibration inputs only (compute-matched)"),
    "coin+distill-calib": Preset("distill", {**_DISTILL, "init": "coin", "coin": _COIN_EXACT}, _COIN_DISTILL,
                                 "COIN (exact) then distillation on the calibration inputs"),
    "coin+distill-train": Preset("distill", {**_DISTILL, "init": "coin", "coin": _COIN_EXACT,
                                             "train_inputs": POOL}, _COIN_DISTILL,
                                 "COIN (exact) then distillation on the pool's inputs"),
    "heads": Preset("heads", {"trunk": "average"}, _HEADS,
                    "merged trunk (w-average) + each model's head, first head layer ridge-refit"),
    "heads-coin": Preset("heads", {"trunk": "coin", "estimator": "exact"}, _HEADS,
                         "merged trunk (COIN, exact Fisher) + each model's head, first head layer ridge-refit"),
    "heads-copy": Preset("heads", {"trunk": "average", "refit": False}, _HEADS,
                         "merged trunk (w-average) + each model's head copied (no refit)"),
    "heads-1.5": Preset("heads", {"trunk": "average", "split": "auto", "max_parity_cost": 1.5},
                        {"calibration": "calibration_sizes"},
                        "heads with split=auto under a parity cost of 1.5 instead of 1.25"),
    "heads-2.0": Preset("heads", {"trunk": "average", "split": "auto", "max_parity_cost": 2.0},
                        {"calibration": "calibration_sizes"},
                        "heads with split=auto under a parity cost of 2.0"),
    "heads-3.0": Preset("heads", {"trunk": "average", "split": "auto", "max_parity_cost": 3.0},
                        {"calibration": "calibration_sizes"},
                        "heads with split=auto under a parity cost of 3.0 (room for two trunks)"),
    "heads-2.0-1trunk": Preset("heads", {"trunk": "average", "split": "auto", "max_parity_cost": 2.0,
                                         "trunk_groups": 1},
                               {"calibration": "calibration_sizes"},
                               "heads-2.0 with one merged trunk only (no trunk groups)"),
    "heads-2.0-polish": Preset("heads", {"trunk": "average", "split": "auto", "max_parity_cost": 2.0,
                                         "polish_epochs": 5},
                               {"calibration": "calibration_sizes"},
                               "heads-2.0, then 5 epochs of per-head distillation"),
    "heads-regmean": Preset("heads", {"trunk": "regmean"}, _HEADS,
                            "heads with the trunk merged by RegMean instead of averaging"),
    "heads-polish": Preset("heads", {"trunk": "average", "polish_epochs": 5}, _HEADS,
                           "heads, then 5 epochs of per-head distillation on the calibration inputs"),
    "base": Preset("base", control=True,
                   description="control: the common initialisation as the coded model (zero cost)"),
    "substitute": Preset("substitute", control=True,
                         description="no parity: the erased output replaced by the survivors' mean"),
    "default": Preset("default", control=True, description="no parity: a constant (uniform) answer"),
}
# fmt: on

DEFAULT_METHODS: list[str] = [
    "heads",
    "heads-coin",
    "heads-copy",
    "coin-exact",
    "coin-sampled",
    "coin-empirical",
    "coin-exact-norm",
    "average",
    "distill-common",
    "distill-random",
    "distill-calib",
    "coin+distill-calib",
    "coin+distill-train",
    "base",
    "substitute",
    "default",
]


# --------------------------------------------------------------------------- controls
def _base_copies(ctx: BuildContext) -> tuple[list[nn.Module], dict]:
    info = {"method": "base", "seconds": 0.0, "forward_passes": 0, "backward_passes": 0}
    return [copy.deepcopy(ctx.base) for _ in range(ctx.code.r)], info


@dataclass(frozen=True)
class _Control:
    build: Callable[[BuildContext], tuple[list[nn.Module], dict]] | None = None  #: coded models, if any
    estimates: Callable | None = None  #: else: (outputs, patterns) -> estimates of the erased outputs


#: What each control does: build stand-in coded models (``base``, parity cost 1), or
#: estimate an erased output without any parity (``substitute``, ``default``, parity cost 0).
CONTROLS: dict[str, _Control] = {
    "base": _Control(build=_base_copies),
    "substitute": _Control(estimates=substitute_estimates),
    "default": _Control(estimates=default_estimates),
}


# --------------------------------------------------------------------------- variants
@dataclass
class BuildContext:
    """What a run hands the presets to build its variants from."""

    cfg: ExperimentConfig
    models: list[nn.Module]
    base: nn.Module
    code: Code
    calib_x: torch.Tensor  #: the largest calibration sample, in a fixed seeded order
    calib_y: torch.Tensor
    pool_x: torch.Tensor
    seed: int
    progress: bool | None = None

    @property
    def has_bn(self) -> bool:
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.base.modules())


@dataclass
class Variant:
    """One point of a preset's grid, ready to build (or a no-parity control)."""

    family: str
    label: str
    params: dict  #: the axis values (the hyper-parameters chosen on validation)
    control: bool
    build: Callable[[], tuple[list[nn.Module], dict]] | None = None  #: -> (coded models, info)
    estimates: Callable | None = None  #: no-parity controls: (outputs, patterns) -> estimates

    @property
    def kind(self) -> str:
        """``"parity"`` (coded models are built and decoded) or ``"estimates"`` (no parity)."""
        return "parity" if self.build is not None else "estimates"


def _resolve(value: Any, ctx: BuildContext) -> Any:
    if isinstance(value, Mapping):
        return {k: _resolve(v, ctx) for k, v in value.items()}
    if not isinstance(value, Ref):
        return value
    if value.what == "config":
        return getattr(ctx.cfg, value.field)
    return {
        "seed": lambda: ctx.seed,
        "progress": lambda: ctx.progress,
        "base": lambda: ctx.base,
        "pool": lambda: ctx.pool_x,
        "buffers": lambda: "recompute" if ctx.has_bn else "average",
    }[value.what]()


def _grid(config: ExperimentConfig, source: str, has_bn: bool) -> list:
    if source in _DERIVED:
        return list(_DERIVED[source](config, has_bn))
    return list(getattr(config, source))


def _label(name: str, point: dict, grids: dict[str, list]) -> str:
    parts = [
        _LABEL.get(k, k + "={}").format(v)
        for k, v in point.items()
        if not (k in _QUIET_WHEN_SINGLE and len(grids[k]) == 1)
    ]
    return " ".join([name, *parts])


def _options(preset: Preset, point: dict) -> dict:
    """The preset's options for one grid point, with the run's defaults, before resolution."""
    declared = {f.name for f in dataclasses.fields(METHODS[preset.method].options)}
    opts = {k: v for k, v in _FROM_RUN.items() if k in declared}
    opts.update(preset.options)
    opts.update({k: v for k, v in point.items() if k != "calibration"})
    return opts


def _points(preset: Preset, config: ExperimentConfig, has_bn: bool):
    grids = {k: _grid(config, src, has_bn) for k, src in preset.axes.items()}
    grids = {k: g for k, g in grids.items() if g}  # an empty derived grid drops its axis
    for values in itertools.product(*grids.values()):
        yield dict(zip(grids, values, strict=True)), grids


def build_variants(ctx: BuildContext) -> list[Variant]:
    """Every variant of every method in ``ctx.cfg.methods``, in that order; nothing is built yet."""
    out: list[Variant] = []
    for name in ctx.cfg.methods:
        preset = PRESETS[name]
        if preset.control:
            ctl = CONTROLS[preset.method]
            build = (lambda f=ctl.build: f(ctx)) if ctl.build is not None else None
            out.append(Variant(name, name, {}, True, build=build, estimates=ctl.estimates))
            continue
        for point, grids in _points(preset, ctx.cfg, ctx.has_bn):
            n = point.get("calibration", max(ctx.cfg.calibration_sizes))
            opts = _resolve(_options(preset, point), ctx)

            def build(method=preset.method, n=n, opts=opts):
                res = encode(ctx.models, ctx.code, (ctx.calib_x[:n], ctx.calib_y[:n]), method=method, **opts)
                return list(res), res.info

            out.append(Variant(name, _label(name, point, grids), dict(point), False, build=build))
    return out


# --------------------------------------------------------------------------- checks before any work
_PLACEHOLDERS: dict[str, Any] = {
    "seed": 0,
    "progress": False,
    "base": nn.Identity(),
    "pool": torch.zeros(2, 1),
    "buffers": "average",
}


def _stand_in(value: Any, config: ExperimentConfig) -> Any:
    if isinstance(value, Mapping):
        return {k: _stand_in(v, config) for k, v in value.items()}
    if isinstance(value, Ref):
        return getattr(config, value.field) if value.what == "config" else _PLACEHOLDERS[value.what]
    return value


def check_presets(config: ExperimentConfig, names: Sequence[str] | None = None) -> None:
    """Refuse, before any training, a preset whose encoder, axes or option values
    cannot work with ``config``: unknown encoders or options, axis fields that do
    not exist or are empty, and option values the encoder's own validation refuses."""
    fields = {f.name for f in dataclasses.fields(config)}
    for name in config.methods if names is None else names:
        preset = PRESETS[name]
        if preset.control:
            if preset.method not in CONTROLS:
                raise CoinferError(
                    f"preset {name!r}: unknown control {preset.method!r}; known {list(CONTROLS)}"
                )
            continue
        if preset.method not in METHODS:
            raise CoinferError(
                f"preset {name!r}: unknown encoder {preset.method!r}; registered: {sorted(METHODS)}"
            )
        for axis, src in preset.axes.items():
            if src not in fields and src not in _DERIVED:
                raise CoinferError(
                    f"preset {name!r}: axis {axis!r} reads config field {src!r}, which does not exist"
                )
            if src in fields and not getattr(config, src):
                raise CoinferError(
                    f"{src} must not be empty: method {name!r} takes its {axis!r} values from it"
                )
        spec = METHODS[preset.method]
        declared = {f.name for f in dataclasses.fields(spec.options)}
        for has_bn in (False, True):
            for point, _ in _points(preset, config, has_bn):
                opts = _options(preset, point)
                unknown = sorted(set(opts) - declared)
                if unknown:
                    raise CoinferError(
                        f"preset {name!r}: encoder {preset.method!r} has no option(s) {unknown}; "
                        f"it accepts {sorted(declared)}"
                    )
                try:
                    o = spec.options(**_stand_in(opts, config))
                    if hasattr(o, "validate"):
                        o.validate()
                except (TypeError, ValueError) as exc:
                    raise CoinferError(f"method {name!r}: {exc}") from None
