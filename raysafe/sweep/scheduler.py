"""ASHA whose rung records survive a resumed sweep.

Tune's saved experiment state holds the trials and the searcher, not the scheduler: after ``Tuner.restore`` an
``ASHAScheduler`` starts with empty rungs, so the trials still to run would only be compared with each other. This
subclass writes its rung records (per bracket: milestone → {trial id: signed metric}) to a JSON file after every
event and reads them back on its first event after the sweep resumes.
"""

from __future__ import annotations

import json
from pathlib import Path

from ray.tune.schedulers import AsyncHyperBandScheduler

from raysafe.atomic import atomic_write_json


class ResumableASHA(AsyncHyperBandScheduler):
    def __init__(self, state_path: str, **kwargs):
        super().__init__(**kwargs)
        self._state_path = state_path
        self._loaded = False

    # --------------------------------------------------------------------------------------------- state file
    def rung_records(self) -> list[list[tuple[float, dict[str, float]]]]:
        """Per bracket, (milestone, {trial id: recorded value}) from the highest milestone down."""
        return [[(float(m), dict(rec)) for m, rec in b._rungs] for b in self._brackets]

    def _write(self) -> None:
        atomic_write_json(Path(self._state_path), {"rungs": self.rung_records(), "num_stopped": self._num_stopped})

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        path = Path(self._state_path)
        if not path.exists():
            return
        state = json.loads(path.read_text())
        for bracket, saved in zip(self._brackets, state["rungs"]):
            for (milestone, recorded), (saved_m, saved_rec) in zip(bracket._rungs, saved):
                if float(milestone) == float(saved_m):
                    recorded.update(saved_rec)
        self._num_stopped = state.get("num_stopped", 0)

    # ------------------------------------------------------------------------------------------ scheduler API
    def on_trial_add(self, tune_controller, trial):
        self._load()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        self._load()
        action = super().on_trial_result(tune_controller, trial, result)
        self._write()
        return action

    def on_trial_complete(self, tune_controller, trial, result):
        self._load()
        super().on_trial_complete(tune_controller, trial, result)
        self._write()
