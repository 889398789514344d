"""A UserError raised inside a Ray worker reaches the driver as the same one sentence.

Plain Ray tasks and actors: `ray.get` raises a `RayTaskError` whose `cause` is the worker's exception
object, so the driver re-raises that UserError itself. Ray Data is different: it wraps an exception of a
`map_batches` function in a new `UserCodeException`, and the original reaches the driver only as text
inside a traceback. So a function or class wrapped by `report_user_errors` hands the message to this
job's `UserErrorBox` actor before it raises, and the driver, inside `reraise_user_errors()`, reads the
messages back when the dataset fails and raises the one that this failure carries (its text holds the
worker's traceback). A message that a lagging worker of an earlier, already failed dataset reports late
is in the box too, but not in this failure: it is never raised for it. No exception text is parsed.

    with reraise_user_errors():        # on the driver
        ds = ds.map_batches(report_user_errors(MyActor), compute=..., ...)
        for batch in ds.iter_batches(): ...
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Callable, Iterator

from blip2_ray.errors import UserError
from blip2_ray.runtime.actors import job_actor

BOX_NAMESPACE = "blip2_ray"


class UserErrorBox:
    """Holds the UserError messages the workers of this Ray job reported since the last `take`, first first."""

    KEEP = 64  # distinct messages; a dataset fails on its first, so a few are ever there

    def __init__(self):
        self._messages: list[str] = []

    def put(self, message: str) -> None:
        if message not in self._messages and len(self._messages) < self.KEEP:
            self._messages.append(message)

    def take(self) -> list[str]:
        messages, self._messages = self._messages, []
        return messages


def _failure_text(error: BaseException) -> str:
    """The text of `error` and of the exceptions it was raised from (Ray's hold the worker's traceback)."""
    texts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        texts.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(texts)


def _box_name() -> str:
    import ray

    return f"UserErrorBox-{ray.get_runtime_context().get_job_id()}"


def _open_box():
    """This job's box (created on first use by the driver, which holds it), emptied."""
    import ray

    box = job_actor(ray.remote(num_cpus=0)(UserErrorBox), _box_name(), BOX_NAMESPACE, create=True)
    ray.get(box.take.remote())
    return box


def _report(error: UserError) -> None:
    """Tell the driver's box (if one listens: a job without `reraise_user_errors` has none)."""
    import ray

    if not ray.is_initialized():
        return
    try:
        box = ray.get_actor(_box_name(), namespace=BOX_NAMESPACE)
    except ValueError:
        return
    ray.get(box.put.remote(str(error)))  # waited on: the message is there before the task fails


def _reporting_iterator(batches: Iterator) -> Iterator:
    try:
        yield from batches
    except UserError as e:
        _report(e)
        raise


def _call_reporting(fn: Callable, batch: Any) -> Any:
    try:
        out = fn(batch)
    except UserError as e:
        _report(e)
        raise
    return _reporting_iterator(out) if inspect.isgenerator(out) else out


def report_user_errors(udf: Callable) -> Callable:
    """`udf` (a `map_batches` function, or a class for an actor pool) reporting its UserErrors.

    A class's constructor error is raised from its first call instead: Ray Data treats an actor that
    fails to start as a broken pool, not as the error of the job. Other exceptions pass untouched.
    """
    if isinstance(udf, type):

        class Reporting(udf):
            def __init__(self, *args, **kwargs):
                self._construction_error: UserError | None = None
                try:
                    super().__init__(*args, **kwargs)
                except UserError as e:
                    self._construction_error = e

            def __call__(self, batch, **kwargs):
                if self._construction_error is not None:
                    _report(self._construction_error)
                    raise self._construction_error
                return _call_reporting(functools.partial(super().__call__, **kwargs), batch)

        Reporting.__name__ = udf.__name__  # Ray Data names the operator after it
        Reporting.__doc__ = udf.__doc__
        return Reporting

    def reporting(batch):
        return _call_reporting(udf, batch)

    reporting.__name__ = getattr(udf, "__name__", type(udf).__name__)
    return reporting


def user_error_in(error: BaseException) -> UserError | None:
    """The UserError a plain Ray task or actor raised, when `error` is the `RayTaskError` of it."""
    from ray.exceptions import RayTaskError

    if isinstance(error, RayTaskError) and isinstance(error.cause, UserError):
        return error.cause
    return None


@contextlib.contextmanager
def reraise_user_errors() -> Iterator[None]:
    """Driver side: a failure of Ray work inside the block that began as a UserError in a worker (a
    `report_user_errors` function or class, or a plain task or actor) raises that UserError, alone."""
    box = _open_box()
    try:
        yield
    except Exception as e:
        import ray

        # the box first: Ray Data appends its retry advice to the worker's exception before it travels; of the
        # messages there, the first this failure carries (a late one from an earlier dataset is not in it)
        text = _failure_text(e)
        message = next((m for m in ray.get(box.take.remote()) if m in text), None)
        cause = UserError(message) if message is not None else user_error_in(e)
        if cause is None:
            raise
        raise cause from None
