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


def unwrap_remote_error(e: BaseException) -> RaysafeError | None:
    """The user-facing error inside a failure reported by Ray, if there is one.

    Ray wraps an exception raised in a task, actor, Ray Data stage or Ray Train worker (``RayTaskError``, Train's
    ``WorkerGroupError.worker_failures`` of ``UserExceptionWithTraceback`` / ``ControllerError.controller_failure``,
    Tune's ``TuneError``) and prints the remote traceback with it. This walks those wrappers (``cause``,
    ``__cause__``, ``__context__``, Train's failure maps and the exception a worker raised) and re-creates the
    first :class:`RaysafeError` it finds as its own raysafe class, without Ray's text. Ray Data stages keep their own
    exception only with ``DataContext.raise_original_map_exception`` (set by :func:`raysafe.runtime.quiet_ray_data`)."""
    seen: set[int] = set()
    stack: list = [e]
    while stack:
        x = stack.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, RaysafeError):
            for cls in type(x).__mro__:  # Ray's RayTaskError(DataError) subclasses ours; take the raysafe class
                if cls.__module__.startswith("raysafe") and issubclass(cls, RaysafeError):
                    return cls(x.what, where=x.where, fix=x.fix)
        failures = getattr(x, "worker_failures", None)
        if isinstance(failures, dict):
            stack.extend(failures[k] for k in sorted(failures))
        stack.extend(
            [
                getattr(x, "_base_exc", None),  # Ray Train V2's UserExceptionWithTraceback: what the worker raised
                getattr(x, "controller_failure", None),
                getattr(x, "cause", None),
                x.__cause__,
                x.__context__,
            ]
        )
    return None


class remote_errors:
    """``with remote_errors(): <await Ray work>`` re-raises a :class:`RaysafeError` raised inside Ray workers as
    itself (see :func:`unwrap_remote_error`); any other failure propagates unchanged."""

    def __enter__(self) -> "remote_errors":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or isinstance(exc, RaysafeError) and type(exc).__module__.startswith("raysafe"):
            return False
        err = unwrap_remote_error(exc)
        if err is not None:
            raise err from None
        return False
