"""The samplers a search may use, and how fixed configs (baselines, grid points) enter a study.

Optuna's relative samplers (NSGA-II, multivariate TPE, GP) learn over the intersection of the
params of every complete trial. A fixed config enters a study as an enqueued trial; if it carried
no params, that intersection would be empty and every later proposal would silently fall back to
independent random sampling (measured: NSGA-II and GP then propose exactly what the random sampler
does). So:
- `enqueue_fixed` gives a fixed config the params the space would ask for it, when the space can
  express it, so the sampler learns from it like from any trial;
- a config the space cannot express (a 16-bit baseline of a space without 16 bits) runs with no
  params, and `_SampledTrialsOnly` hides such trials from the sampler.
"""

from __future__ import annotations

from collections.abc import Callable

from optuna.samplers import BaseSampler

from kvpareto.config import Config
from kvpareto.registry import Registry
from kvpareto.search.space import SearchSpace

SAMPLERS: Registry[Callable[[int], object]] = Registry("sampler")  # seed -> an Optuna sampler

# A proposal of a config the study already finished costs nothing (the trial cache answers it),
# so a budget of N trials counts distinct configs. A sampler that keeps proposing what it has
# seen has converged: after REPEAT_LIMIT x N proposals its repeats count too. The search
# (`Search.finished`) and the replay benchmark (`replay.replay`) stop at the same point.
REPEAT_LIMIT = 5


@SAMPLERS.register("nsga2")
def _nsga2(seed: int):
    from optuna.samplers import NSGAIISampler

    return NSGAIISampler(seed=seed, population_size=8)


@SAMPLERS.register("tpe")
def _tpe(seed: int):
    from optuna.samplers import TPESampler

    return TPESampler(seed=seed, multivariate=True, n_startup_trials=6)


@SAMPLERS.register("gp")
def _gp(seed: int):
    from optuna.samplers import GPSampler

    return GPSampler(seed=seed, n_startup_trials=6)


def _random(seed: int):
    from optuna.samplers import RandomSampler

    return RandomSampler(seed=seed)


SAMPLERS.add("grid", _random)  # every grid point is enqueued (`Search.prepare`): never asked
SAMPLERS.add("random", _random)


def make_sampler(name: str, seed: int):
    """The named sampler, seeing only the trials whose params it can learn from."""
    return _SampledTrialsOnly(SAMPLERS.get(name)(seed))


def enqueue_fixed(
    study, space: SearchSpace, configs: list[Config], n_layers: int = 0, attrs: dict | None = None
) -> None:
    """Enqueue each distinct config once, with its params where the space can express it, and
    `attrs` among its user attributes."""
    seen = set()
    for config in configs:
        if config.key() in seen:
            continue
        seen.add(config.key())
        params = space.params_of(config, n_layers)
        fixed = {"fixed_config": config.to_dict(), "in_space": params is not None}
        study.enqueue_trial(params or {}, user_attrs={**fixed, **(attrs or {})})


def trial_config(trial, space: SearchSpace, n_layers: int = 0) -> Config:
    """The config a trial evaluates: its fixed config, or the space's suggestion. A fixed config
    the space expresses is suggested too (its enqueued params come back), so the trial holds
    params the sampler can learn from."""
    fixed = trial.user_attrs.get("fixed_config")
    if fixed and not trial.user_attrs.get("in_space"):  # also fixed trials of older studies
        return Config.from_dict(fixed)
    config = space.suggest(trial, n_layers)
    if fixed and config.key() != Config.from_dict(fixed).key():
        raise RuntimeError(f"enqueued {fixed} came back as {config.label()}")
    return config


def _hidden(trial) -> bool:
    """A fixed config run without params (the space could not express it, or the study was
    made before fixed configs carried params): nothing to learn from."""
    return "fixed_config" in trial.user_attrs and not trial.params


class _StudyView:
    """A study as the sampler sees it: without hidden trials. Optuna samplers read trials through
    `Study._get_trials`, a private method and the only way to filter what they learn from; the
    compat check (.ci/compat) runs the samplers against the newest Optuna, where a rename fails
    loudly in the search tests."""

    def __init__(self, study):
        self._study = study

    def __getattr__(self, name):
        return getattr(self._study, name)

    def _get_trials(self, *args, **kwargs):
        return [t for t in self._study._get_trials(*args, **kwargs) if not _hidden(t)]

    def get_trials(self, *args, **kwargs):
        return [t for t in self._study.get_trials(*args, **kwargs) if not _hidden(t)]


class _SampledTrialsOnly(BaseSampler):
    """Delegates to an Optuna sampler, showing it the study without hidden trials."""

    def __init__(self, inner):
        self.inner = inner

    def infer_relative_search_space(self, study, trial):
        return self.inner.infer_relative_search_space(_StudyView(study), trial)

    def sample_relative(self, study, trial, search_space):
        return self.inner.sample_relative(_StudyView(study), trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        view = _StudyView(study)
        return self.inner.sample_independent(view, trial, param_name, param_distribution)

    def before_trial(self, study, trial):
        self.inner.before_trial(_StudyView(study), trial)

    def after_trial(self, study, trial, state, values):
        self.inner.after_trial(_StudyView(study), trial, state, values)

    def reseed_rng(self):
        self.inner.reseed_rng()
