"""The Tune callback that records trials in MLflow. Its hooks run in the Tune driver, the only
process writing to MLflow. It keeps nothing it cannot find again: Tune pickles it with the
search, and after `hft-ray tune --resume` an unpickled copy finds each trial's child run by its
trial id and skips the stages that run has logged already."""

from __future__ import annotations

import json
import logging

from ray.tune import Callback

from hft_ray.run.tracking import SearchTracker

log = logging.getLogger("hft_ray.tune")  # the driver shows it (hft_ray/run/tuning.py)

SUMMARY = ("objective", "OP", "BWT", "FWT", "forgetting", "heldout_delta")
LOGGED = (*SUMMARY, *(f"{k}.std" for k in SUMMARY), "seeds", "train/loss", "time/train_s", "time/step_s",
          "trained_fraction_by_params", "trained_fraction_by_matrices")  # `.std`, `seeds`: over a trial's seeds


def trial_config(trial, keys) -> dict:
    return {k: trial.config[k] for k in keys if k in trial.config}


class TrialLogger(Callback):
    def __init__(self, tracking_uri: str, experiment: str, parent_id: str, total_stages: int, searched: tuple):
        self.tracking_uri, self.experiment, self.parent_id = tracking_uri, experiment, parent_id
        self.total, self.searched = total_stages, searched
        self._tracker = None
        self.runs: dict[str, tuple[str, int]] = {}   # trial id -> (run id, last stage logged)
        self.last: dict[str, dict] = {}              # trial id -> its last result

    def __getstate__(self):
        return {**self.__dict__, "_tracker": None, "runs": {}, "last": {}}

    @property
    def tracker(self) -> SearchTracker:
        if self._tracker is None:
            self._tracker = SearchTracker(self.tracking_uri, self.experiment)
        return self._tracker

    def _run(self, trial) -> tuple[str, int]:
        if trial.trial_id not in self.runs:
            config = trial_config(trial, self.searched)
            name = "trial " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in config.items())
            self.runs[trial.trial_id] = self.tracker.trial_run(self.parent_id, trial.trial_id, name, config)
        return self.runs[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        self._run(trial)
        log.info(f"[hft-ray] trial {trial.trial_id} started: {trial_config(trial, self.searched)}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id, logged = self._run(trial)
        stage = int(result["stage"])
        self.last[trial.trial_id] = result
        if stage <= logged:
            return  # logged before the search was resumed
        numbers = {k: v for k, v in result.items() if k in LOGGED or k.startswith("eval/")}
        self.tracker.log_metrics(run_id, numbers, step=stage)
        self.runs[trial.trial_id] = (run_id, stage)
        spread = f" ± {result['objective.std']:.4f} over {result['seeds']} seeds" if "objective.std" in result else ""
        log.info(f"[hft-ray] trial {trial.trial_id} stage {stage}/{self.total}: "
                 f"objective {result['objective']:.4f}{spread}"
                 f" (OP {result.get('OP', float('nan')):.3f}, BWT {result.get('BWT', float('nan')):+.3f})")

    def on_trial_complete(self, iteration, trials, trial, **info):
        if trial.trial_id not in self.runs:
            return  # never started (the search ended first): no run to close
        run_id, logged = self.runs[trial.trial_id]
        result = self.last.get(trial.trial_id)
        matrix = json.loads(result["matrix"]) if result else None
        outcome = self.tracker.end_trial(run_id, logged, self.total, matrix)
        if outcome == "stopped_early":
            log.info(f"[hft-ray] trial {trial.trial_id} stopped early after stage {logged} (scheduler)")

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id, _ = self._run(trial)
        where = trial.local_path or trial.path
        self.tracker.fail(run_id, f"trial failed; logs in {where}")
        log.info(f"[hft-ray] trial {trial.trial_id} failed; logs in {where}")
