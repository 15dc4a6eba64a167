"""User-facing errors: each says what was wrong, where, and what to do.

Every failure a user can cause (bad config, bad data, a missing model, an output directory that belongs to
another run) is raised as a subclass of :class:`RaysafeError`. The CLI prints ``str(err)`` without a traceback.
"""

from __future__ import annotations


class RaysafeError(Exception):
    """Base class. ``what`` is the problem, ``where`` locates it (file, row, field, language, layer),
    ``fix`` says what to do about it."""

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(self._render())

    def _render(self) -> str:
        parts = [self.what]
        if self.where:
            parts.append(f"  where: {self.where}")
        if self.fix:
            parts.append(f"  fix:   {self.fix}")
        return "\n".join(parts)


class ConfigError(RaysafeError):
    """A configuration value is missing, of the wrong type, or not one of the allowed values."""


class DataError(RaysafeError):
    """Input rows violate a data contract (missing column, empty text, unknown language, ...)."""


class ModelError(RaysafeError):
    """A model cannot be found or loaded, or a layer index is out of range."""


class OutputError(RaysafeError):
    """An output location holds something incompatible (another model's activations, another run's checkpoint)."""


def raysafe_cause(e: BaseException) -> RaysafeError | None:
    """The user-facing error inside a failure that Ray wrapped (an error raised in an actor or task reaches the
    driver inside Ray's own exception types), re-created without Ray's traceback text; None when there is none."""
    seen = set()
    stack = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, RaysafeError):
            for cls in type(x).__mro__:
                if cls.__module__.startswith("raysafe") and issubclass(cls, RaysafeError):
                    return cls(x.what, where=x.where, fix=x.fix)
        stack.extend([getattr(x, "cause", None), x.__cause__, x.__context__])
    return None
