"""ASHA whose state survives a resumed sweep.

Ray 2.60's ``Tuner.restore`` restores the trials, the searcher and the callbacks, not the scheduler: a restored
experiment starts from the ``ASHAScheduler`` it was created with (empty rungs), so the trials still to run would
only be compared with each other. This subclass saves itself with Tune's public scheduler API
(``TrialScheduler.save``, after every event, to a file beside the experiment) and restores from that file
(``TrialScheduler.restore``) on its first event after the sweep resumes.
"""

from __future__ import annotations

import os
from pathlib import Path

from ray.tune.schedulers import AsyncHyperBandScheduler


class ResumableASHA(AsyncHyperBandScheduler):
    def __init__(self, state_path: str, **kwargs):
        super().__init__(**kwargs)
        self._state_path = state_path
        self._loaded = False

    # --------------------------------------------------------------------------------------------- state file
    def _write(self) -> None:
        """``save`` to a temporary file, then moved into place: a sweep killed mid-write keeps the last state."""
        tmp = f"{self._state_path}.tmp-{os.getpid()}"
        self.save(tmp)
        os.replace(tmp, self._state_path)

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if Path(self._state_path).exists():
            state_path = self._state_path
            self.restore(state_path)
            self._state_path, self._loaded = state_path, True

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
