"""Studies: the protocol every study module follows, and the registry that finds them.

A study answers some of the article's claims by experiment. It is **one module** in this package
(adding a study = adding one file; the registry discovers it with :mod:`pkgutil`), defining:

``NAME: str``
    Short id used on the command line, e.g. ``"batch-size"``.
``TITLE: str`` / ``SUMMARY: str``
    Section title in the report / one-line description for ``normlab studies``.
``ORDER: int``
    Position of the study in the report (ascending, ties broken by name).
``Config``
    A dataclass whose defaults are the full grid, with a classmethod ``quick()`` returning a
    small profile (used by ``--quick`` and ``normlab demo``, which must stay cheap). Field names
    shared with the common CLI options (``norms``, ``batch_sizes``, ``seeds``, ``epochs``,
    ``data``, ``model``) are settable from the command line (:func:`apply_overrides`).
``runs(cfg) -> list[dict]``
    The run configs: full, JSON-serializable, each with a ``"runner"`` key (see
    :mod:`normlab.lab.runners`). A run's id is the hash of its config, so identical configs
    across studies are computed once.
``analyze(results: list[RunResult], cfg) -> list[Card]``
    Answer cards from the finished runs (``status == "done"``; failures are listed by the report).
``plot(results: list[RunResult], cfg, outdir: Path) -> list[Figure]``
    Figures saved as PNG files under ``outdir`` (matplotlib is set to the Agg backend).

Optional: ``HIDDEN = True`` keeps the study out of ``normlab demo`` and ``normlab studies``
(without ``--all``); ``validate(cfg)`` raises ``ValueError`` with a clear message for bad
settings, before anything runs; ``MIN_SEEDS: int`` (default :data:`DEFAULT_MIN_SEEDS` = 3),
the fewest seeds per arm at which a card's "supported"/"not supported" is shown (below it the
report prints :data:`NOT_TESTED` instead, see :func:`withhold_verdicts`);
``ranking(results, cfg) -> list[Ranking]``: per task, one value per seed of one metric for each
norm (see :class:`Ranking`) — the report ranks the norms from it in its answers and ranks
BatchNorm among the methods of every task for the article's conclusion.

The report opens with the article's three questions (:data:`QUESTIONS`); a card answers one by
naming its id in ``Card.answers`` (and its evidence figure, by file name, in ``Card.figure``);
a :class:`Ranking` by its ``question``.

Helpers: :mod:`normlab.lab.analysis` (metric values of the finished runs, by seed, log-ratio
intervals, number formats) with the statistics of :mod:`normlab.lab.stats`;
:mod:`normlab.lab.plotting` (one colour and marker per norm, interval bars and bands, saving);
:mod:`normlab.lab.hooks` (training hooks); the shared ``measured-train`` runner
(:mod:`normlab.lab.measured`). A study imports those, never another study. How to add one:
``docs/CONTRACTS.md``.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import pkgutil
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from normlab.lab.stats import Interval
from normlab.lab.store import RunResult, Store, run_id

__all__ = [
    "CARD_VERDICTS",
    "DEFAULT_MIN_SEEDS",
    "NOT_TESTED",
    "QUESTIONS",
    "Card",
    "Ranking",
    "Figure",
    "OVERRIDE_OPTIONS",
    "Study",
    "StudyError",
    "all_studies",
    "apply_overrides",
    "broken_studies",
    "config_from_dict",
    "config_meta",
    "config_meta_key",
    "get_study",
    "load_all",
    "expected_run_ids",
    "load_study_config",
    "load_study_meta",
    "merge_data_options",
    "card_seeds",
    "save_study_config",
    "seed_count",
    "withhold_verdicts",
]

#: The verdict a card gets when its profile has too few seeds to decide (see
#: :func:`withhold_verdicts`); it counts neither for nor against the claim.
NOT_TESTED = "not tested at this profile"

CARD_VERDICTS: tuple[str, ...] = ("supported", "not supported", "inconclusive", "answer", NOT_TESTED)

#: Fewest seeds per arm for a "supported"/"not supported" verdict (a study may set ``MIN_SEEDS``).
DEFAULT_MIN_SEEDS = 3

#: The article's three questions, which the report answers first: id -> question. A card names
#: the one it answers in ``Card.answers``, a ranking in ``Ranking.question``.
QUESTIONS: dict[str, str] = {
    "architecture": "Which normalization for CNNs, RNNs, transformers…?",
    "batch-size": "What happens when the batch size changes?",
    "cost": "Which gives the best cost/accuracy trade-off?",
}

#: Common command-line options and the Config field each one sets.
OVERRIDE_OPTIONS: dict[str, str] = {
    "norms": "norms",
    "batch_sizes": "batch_sizes",
    "seeds": "seeds",
    "epochs": "epochs",
    "data": "data",
    "model": "model",
}


#: Most seeds a command may ask for, and most runs one study's grid may have (checked before
#: the run configs are built, so an absurd grid is an error, not an out-of-memory crash).
MAX_SEEDS = 10_000
MAX_RUNS = 100_000


class StudyError(ValueError):
    """A user-facing error about a study (unknown name, option it does not have, bad setting)."""


@dataclass
class Card:
    """One answer in the report: a claim (or question), what was measured, and the verdict.

    Attributes:
        study: the study's ``NAME``.
        claim: the article's claim, as text.
        measurement: what the data say, with numbers (means with 95% CIs).
        verdict: ``"supported"``, ``"not supported"``, ``"inconclusive"`` (computed from the
            intervals, see :func:`normlab.lab.stats.verdict`), or ``"answer"`` for a question
            that has no true/false answer (e.g. "which norm for CNNs?").
        question: the article's question this card answers, if any.
        effect: the interval the verdict was computed from (shown in the summary table).
        effect_label: what ``effect`` is, with its unit, e.g. ``"error at bs 2 − error at bs 32
            (points)"`` or ``"κ_raw / κ_std (×)"``: the summary table prints it beside the interval.
        details: further explanation (method, caveats); plain text.
        answers: the id (a key of :data:`QUESTIONS`) of the article's question this card is
            evidence for; the report quotes it in that question's answer.
        figure: the file name (e.g. ``"batch_size_error.png"``) or title of the study's figure
            that shows this card's evidence (its thumbnail goes beside the answer).
        verdict_note: why the verdict is what it is when the report changed it (set by
            :func:`withhold_verdicts`, e.g. ``"2 seeds; 3 needed"``).
    """

    study: str
    claim: str
    measurement: str
    verdict: str
    question: str | None = None
    effect: Interval | None = None
    details: str = ""
    effect_label: str = ""
    answers: str | None = None
    figure: str | None = None
    verdict_note: str = ""

    def __post_init__(self) -> None:
        if self.verdict not in CARD_VERDICTS:
            raise ValueError(
                f"Card.verdict must be one of {', '.join(map(repr, CARD_VERDICTS))}; "
                f"got {self.verdict!r}"
            )
        if self.effect is not None and not isinstance(self.effect, Interval):
            raise TypeError(f"Card.effect must be an Interval or None, got {type(self.effect)}")
        _check_question("Card.answers", self.answers)


def _check_question(what: str, qid: str | None) -> None:
    if qid is not None and qid not in QUESTIONS:
        raise ValueError(
            f"{what} must be None or one of {', '.join(map(repr, QUESTIONS))}; got {qid!r}"
        )


@dataclass
class Ranking:
    """One metric of every norm on one task, one value per seed: what a study's optional
    ``ranking(results, cfg)`` hook returns.

    The report orders the norms by mean (with 95% intervals), writes the order as a sentence in
    the answer to ``question``, and ranks BatchNorm among the methods of every task for the
    article's conclusion "BatchNorm is still the best and most widely applicable".

    Attributes:
        study: the study's ``NAME``.
        task: what was trained on what, in words, e.g. ``"CNN on digits, batch 16"`` (a task
            where ``"bn"`` is missing counts as one where BatchNorm was not run).
        metric: the metric, e.g. ``"validation error"``.
        values: ``{norm: [one value per seed]}``, finite (count a diverged run as the metric's
            worst value, e.g. 100 % error, rather than leave it out); a norm with none is dropped.
        lower_is_better: the metric's direction (error, loss: True; accuracy: False).
        unit: printed after each number, e.g. ``"%"``.
        bounds: the metric's range, e.g. ``(0, 100)`` for a percentage: intervals are clipped
            to it (the true mean lies inside it, so the clipped interval covers it as often).
        question: the id (a key of :data:`QUESTIONS`) whose answer quotes this ranking, or None
            (then it counts only for the conclusion).
        evidence: the ``question`` or ``claim`` text of the study's card that shows these
            numbers (the answer links to it); figure: as :attr:`Card.figure`.
    """

    study: str
    task: str
    metric: str
    values: dict[str, list[float]]
    lower_is_better: bool = True
    unit: str = ""
    bounds: tuple[float, float] | None = None
    question: str | None = None
    evidence: str | None = None
    figure: str | None = None

    def __post_init__(self) -> None:
        _check_question("Ranking.question", self.question)
        if not isinstance(self.values, dict):
            raise TypeError(f"Ranking.values must be a dict norm -> list of values, got {type(self.values)}")
        self.values = {str(k): [float(v) for v in vs] for k, vs in self.values.items() if len(vs)}
        bad = {k: vs for k, vs in self.values.items() if not all(math.isfinite(v) for v in vs)}
        if bad:
            raise ValueError(f"Ranking.values must be finite numbers, got {bad!r} ({self.task})")
        if self.bounds is not None and not (len(self.bounds) == 2 and self.bounds[0] < self.bounds[1]):
            raise ValueError(f"Ranking.bounds must be (low, high) with low < high, got {self.bounds!r}")


@dataclass
class Figure:
    """A figure of the report: a PNG file and its caption."""

    title: str
    path: Path
    caption: str = ""

    def __post_init__(self) -> None:
        self.path = Path(self.path)


@dataclass(frozen=True)
class Study:
    """A loaded study module, with its protocol members as attributes."""

    module: ModuleType

    @property
    def name(self) -> str:
        return str(self.module.NAME)

    @property
    def title(self) -> str:
        return str(self.module.TITLE)

    @property
    def summary(self) -> str:
        return str(self.module.SUMMARY)

    @property
    def order(self) -> int:
        return int(getattr(self.module, "ORDER", 1000))

    @property
    def hidden(self) -> bool:
        return bool(getattr(self.module, "HIDDEN", False))

    @property
    def min_seeds(self) -> int:
        """The study's ``MIN_SEEDS`` (default :data:`DEFAULT_MIN_SEEDS`)."""
        return int(getattr(self.module, "MIN_SEEDS", DEFAULT_MIN_SEEDS))

    @property
    def Config(self) -> type:  # noqa: N802 - mirrors the module attribute
        return self.module.Config

    def default_config(self, quick: bool = False) -> Any:
        """The full-grid Config, or its ``quick()`` profile."""
        return self.Config.quick() if quick else self.Config()

    def validate(self, cfg: Any) -> None:
        """Run the study's optional ``validate(cfg)``; its ``ValueError`` becomes a StudyError."""
        fn = getattr(self.module, "validate", None)
        if fn is None:
            return
        try:
            fn(cfg)
        except StudyError:
            raise
        except ValueError as exc:
            raise StudyError(f"study {self.name!r}: {exc}") from exc

    def runs(self, cfg: Any) -> list[dict[str, Any]]:
        """The run configs of ``cfg`` (checked to be a non-empty list of dicts)."""
        configs = list(self.module.runs(cfg))
        for i, c in enumerate(configs):
            if not isinstance(c, dict):
                raise TypeError(
                    f"study {self.name!r}: runs() item {i} is a {type(c).__name__}, not a dict"
                )
        return configs

    def analyze(self, results: list[RunResult], cfg: Any) -> list[Card]:
        return list(self.module.analyze(results, cfg))

    def plot(self, results: list[RunResult], cfg: Any, outdir: Path) -> list[Figure]:
        return list(self.module.plot(results, cfg, outdir))

    def ranking(self, results: list[RunResult], cfg: Any) -> list[Ranking]:
        """The study's optional ``ranking(results, cfg)`` (``[]`` when it has none)."""
        fn = getattr(self.module, "ranking", None)
        if fn is None:
            return []
        out = list(fn(results, cfg))
        for r in out:
            if not isinstance(r, Ranking):
                raise TypeError(f"study {self.name!r}: ranking() returned a {type(r).__name__}, expected Ranking")
        return out


def seed_count(cfg: Any) -> int | None:
    """Seeds per arm of a study Config: its ``seeds`` field (a count or a sequence), else None."""
    seeds = getattr(cfg, "seeds", None)
    if isinstance(seeds, bool):
        return None
    if isinstance(seeds, int):
        return seeds
    if isinstance(seeds, (list, tuple)):
        return len(seeds)
    return None


def card_seeds(card: Card, seeds: int | None = None) -> int | None:
    """Seeds per arm behind a card: the smaller of its effect interval's ``n`` and ``seeds``
    (the profile's seeds per arm), of those that are known; None when neither is."""
    known = [n for n in ((card.effect.n if card.effect is not None else None), seeds) if n is not None]
    return min(known) if known else None


def withhold_verdicts(cards: list[Card], min_seeds: int, seeds: int | None = None) -> list[Card]:
    """The cards with every "supported"/"not supported" verdict that rests on fewer than
    ``min_seeds`` seeds per arm replaced by :data:`NOT_TESTED`, and the reason in
    ``verdict_note`` (e.g. ``"2 seeds; 3 needed"``).

    A card's seeds per arm: :func:`card_seeds`; a card with no known count keeps its verdict.
    A 95% interval from two seeds has a t quantile of 12.7: a verdict from it says more about
    the draw than about the claim, and the quick profile must not contradict the full grid.
    The single place where this rule is applied: the report calls it on every study's cards.
    """
    out = []
    for card in cards:
        n = card_seeds(card, seeds)
        if card.verdict in ("supported", "not supported") and n is not None and n < min_seeds:
            card = dataclasses.replace(
                card, verdict=NOT_TESTED,
                verdict_note=f"{n} seed{'s' if n != 1 else ''}; {min_seeds} needed",
            )
        out.append(card)
    return out


_REQUIRED = ("NAME", "TITLE", "SUMMARY", "Config", "runs", "analyze", "plot")
_STUDIES: dict[str, Study] | None = None
_BROKEN: dict[str, str] = {}  # module name -> error text


def _check_module(mod: ModuleType) -> None:
    missing = [a for a in _REQUIRED if not hasattr(mod, a)]
    if missing:
        raise TypeError(f"study module {mod.__name__} lacks {', '.join(missing)}")
    if not dataclasses.is_dataclass(mod.Config):
        raise TypeError(f"study module {mod.__name__}: Config must be a dataclass")
    if not callable(getattr(mod.Config, "quick", None)):
        raise TypeError(f"study module {mod.__name__}: Config must have a classmethod quick()")


def load_all(*, strict: bool = False) -> dict[str, Study]:
    """Import every study module of this package (once) and return them by name.

    A module that fails to import or does not follow the protocol is skipped with a warning
    (``strict=True`` raises instead), so that one broken study does not take the others down;
    :func:`broken_studies` lists them and :func:`get_study` reports the error for that name.
    """
    global _STUDIES
    if _STUDIES is not None and not strict:
        return _STUDIES
    found: dict[str, Study] = {}
    _BROKEN.clear()
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        modname = f"{__name__}.{info.name}"
        try:
            mod = importlib.import_module(modname)
            _check_module(mod)
            name = str(mod.NAME)
            if name in found:
                raise TypeError(
                    f"study NAME {name!r} is used by both {found[name].module.__name__} "
                    f"and {modname}"
                )
        except Exception as exc:
            if strict:
                raise
            _BROKEN[modname] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            warnings.warn(f"study module {modname} skipped: {_BROKEN[modname]}", stacklevel=2)
            continue
        found[name] = Study(mod)
    _STUDIES = found
    return found


def broken_studies() -> dict[str, str]:
    """Study modules that failed to load (module name -> error), after :func:`load_all`."""
    load_all()
    return dict(_BROKEN)


def all_studies(include_hidden: bool = False) -> list[Study]:
    """Every study, sorted by ``(ORDER, NAME)``; hidden ones only if ``include_hidden``."""
    studies = load_all().values()
    return sorted(
        (s for s in studies if include_hidden or not s.hidden), key=lambda s: (s.order, s.name)
    )


def get_study(name: str) -> Study:
    """The study called ``name``; :class:`StudyError` listing the valid names otherwise."""
    studies = load_all()
    if name in studies:
        return studies[name]
    broken = [m for m in _BROKEN if m.rsplit(".", 1)[-1].replace("_", "-") == name.replace("_", "-")]
    if broken:
        raise StudyError(f"study {name!r} failed to load: {_BROKEN[broken[0]]}")
    valid = ", ".join(sorted(studies)) or "(none registered)"
    raise StudyError(f"unknown study {name!r}; valid studies: {valid}")


# -- configs -----------------------------------------------------------------------------------


def _coerce_like(template: Any, value: Any) -> Any:
    """Give ``value`` the container type of the field's default (tuple vs list)."""
    if isinstance(template, tuple) and isinstance(value, list):
        return tuple(value)
    if isinstance(template, list) and isinstance(value, tuple):
        return list(value)
    return value


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def apply_overrides(cfg: Any, *, study: str | None = None, **options: Any) -> Any:
    """Return a copy of ``cfg`` with the common CLI options set (``None`` = not given).

    Options: ``norms`` (list of names), ``batch_sizes`` (list of ints), ``seeds`` (a count N:
    seeds ``0..N-1``, or a list of seeds), ``epochs``, ``data``, ``model``. An option the study's
    Config has no field for raises :class:`StudyError` naming the study and the option.
    """
    study_name = study or type(cfg).__module__.rsplit(".", 1)[-1]
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    changes: dict[str, Any] = {}
    for opt, value in options.items():
        if value is None:
            continue
        if opt not in OVERRIDE_OPTIONS:
            raise StudyError(
                f"unknown override {opt!r}; valid: {', '.join(sorted(OVERRIDE_OPTIONS))}"
            )
        fname = OVERRIDE_OPTIONS[opt]
        if fname not in fields and f"{fname}s" in fields and isinstance(value, str):
            # --model / --data on a study that sweeps several: one (or a comma-separated list)
            fname, value = f"{fname}s", [v.strip() for v in value.split(",") if v.strip()]
        if fname not in fields:
            have = [o for o, f in OVERRIDE_OPTIONS.items() if f in fields]
            flag = "--" + opt.replace("_", "-")
            raise StudyError(
                f"study {study_name!r} has no option {flag}; it accepts: "
                + (", ".join("--" + o.replace("_", "-") for o in have) or "none of the common options")
            )
        current = getattr(cfg, fname, _field_default(fields[fname]))
        if opt == "seeds" and isinstance(value, int) and value > MAX_SEEDS:
            raise StudyError(f"--seeds: expected at most {MAX_SEEDS} seeds, got {value}")
        if opt == "seeds" and isinstance(value, int) and not isinstance(current, int):
            if value < 1:
                raise StudyError(f"--seeds must be >= 1, got {value}")
            value = list(range(value))
        if isinstance(value, (list, tuple)) and len(value) == 0:
            raise StudyError(f"--{opt.replace('_', '-')} needs at least one value")
        changes[fname] = _coerce_like(current, value)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def config_from_dict(study: Study, data: dict[str, Any]) -> Any:
    """Rebuild a study's Config from its stored dict (unknown keys ignored, tuples restored)."""
    fields = {f.name: f for f in dataclasses.fields(study.Config)}
    kwargs = {
        k: _coerce_like(_field_default(fields[k]), v) for k, v in data.items() if k in fields
    }
    return study.Config(**kwargs)


def config_meta_key(study_name: str) -> str:
    """The store meta key under which the Config a study is run with is recorded."""
    return f"study:{study_name}:config"


def config_meta(
    study: Study, cfg: Any, *, quick: bool = False, data_options: dict[str, Any] | None = None
) -> tuple[str, dict[str, Any]]:
    """The store meta entry (key, value) recording the Config a study is run with.

    ``data_options``: the command line's ``--data-option`` values, merged into every run config
    that has data (:func:`merge_data_options`); recorded so that the report finds those runs.
    """
    value: dict[str, Any] = {"config": dataclasses.asdict(cfg), "quick": quick}
    if data_options:
        value["data_options"] = dict(data_options)
    return config_meta_key(study.name), value


def merge_data_options(
    configs: list[dict[str, Any]], data_options: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """Run configs with ``data_options`` added to the ``data_options`` of those that have data."""
    if not data_options:
        return configs
    out = []
    for c in configs:
        if "data" in c:
            current = c.get("data_options") or {}
            if not isinstance(current, dict):
                raise StudyError(f"run config {c!r}: data_options is not a dict")
            c = {**c, "data_options": {**current, **data_options}}
        out.append(c)
    return out


def expected_run_ids(store: Store, study: Study, cfg: Any) -> set[str]:
    """Ids of the runs a recorded study config stands for, as the sweep computed them."""
    # The sweep (and whatever executor it brings) is needed only here, not to list studies.
    from normlab.lab.sweep import prepare_configs

    stored = store.get_meta(config_meta_key(study.name)) or {}
    configs = merge_data_options(study.runs(cfg), stored.get("data_options"))
    return {run_id(c) for c in prepare_configs(configs)}


def save_study_config(store: Store, study: Study, cfg: Any, *, quick: bool = False) -> None:
    """Record the Config a study was run with (the report rebuilds it from there)."""
    store.set_meta(*config_meta(study, cfg, quick=quick))


def load_study_config(store: Store, study: Study) -> Any | None:
    """The Config recorded by :func:`save_study_config`, or ``None`` if there is none."""
    stored = store.get_meta(config_meta_key(study.name))
    if stored is None:
        return None
    return config_from_dict(study, stored.get("config", {}))


def load_study_meta(store: Store, study: Study) -> dict[str, Any] | None:
    """The whole entry :func:`config_meta` recorded (``config``, ``quick``, ``data_options``)."""
    stored = store.get_meta(config_meta_key(study.name))
    return stored if isinstance(stored, dict) else None
