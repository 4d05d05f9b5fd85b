"""What a backend can segment, and which profiles one run of it serves together.

A route may name several profiles (``profiles: [lungs, bone]``).  Their jobs
share the model runs of the series (:mod:`segnode.node.jobs.shared_run`): one
run per *run key* of the backend, shared by every profile with that key:

* ``hu_based``: the profile's HU method (``options.hu_based.method``), so
  two profiles with the same method share one run and different methods each
  run once;
* ``totalsegmentator``: the task and resolution (the ``roi_subset`` is the union);
* ``nnunet`` / ``monai``: the imported model's name (``options.<backend>.model``,
  else ``model_checkpoint``, else the organ).

:func:`cannot_segment` says why a backend cannot make a profile's tissues;
:func:`route_problems` is what the rules loader (node start-up, rules reload,
``segnode route test``) refuses a route for.  Only profile data is read here;
no backend library is imported.
"""

from __future__ import annotations

from collections.abc import Sequence

from segnode.profiles.schema import Backend, Profile

#: hu_based method → the tissue names it produces, in the order its function returns them.
METHOD_TISSUES: dict[str, tuple[str, ...]] = {
    "brain": ("brain", "shell"),
    "lungs": ("lung_left", "lung_right"),
    "bone": ("bone",),
}


def cannot_segment(backend: Backend, profile: Profile) -> str | None:
    """Why ``backend`` cannot make ``profile``'s tissues (a sentence), or ``None`` if it can."""
    names = [t.name for t in profile.tissues]
    if backend is Backend.HU_BASED:
        if profile.options.hu_based is None:
            return "the profile has no options.hu_based.method"
        method = profile.options.hu_based.method
        wanted = METHOD_TISSUES[method]
        if sorted(names) != sorted(wanted):
            return f"hu_based method {method!r} produces tissues {list(wanted)}, the profile has {names}"
        missing = [t.name for t in profile.tissues if t.hu_range is None]
        return f"tissues {missing} have no hu_range" if missing else None
    if backend is Backend.TOTALSEGMENTATOR:
        missing = [t.name for t in profile.tissues if not t.totalsegmentator]
        return f"tissues {missing} name no TotalSegmentator classes" if missing else None
    missing = [t.name for t in profile.tissues if t.label is None]
    return f"tissues {missing} have no model 'label'" if missing else None


def run_key(backend: Backend, profile: Profile) -> str:
    """What one run of ``backend`` for ``profile`` is (profiles with the same key share it)."""
    options = profile.options
    if backend is Backend.HU_BASED:
        return f"hu_based-{options.hu_based.method if options.hu_based else '?'}"
    if backend is Backend.TOTALSEGMENTATOR:
        ts = options.totalsegmentator
        return f"totalsegmentator-{ts.task}-{ts.resolution}"
    named = options.nnunet.model if backend is Backend.NNUNET else options.monai.model
    return f"{backend.value}-{named or profile.model_checkpoint or profile.organ}"


def run_groups(backend: Backend, profiles: Sequence[Profile]) -> list[tuple[Profile, ...]]:
    """``profiles`` grouped by :func:`run_key`, in first-seen order: one backend run per group."""
    groups: dict[str, list[Profile]] = {}
    for profile in profiles:
        groups.setdefault(run_key(backend, profile), []).append(profile)
    return [tuple(group) for group in groups.values()]


def route_problems(profiles: Sequence[Profile], backend: Backend | None) -> list[str]:
    """Why a route with these profiles (and the route's ``backend``, if any) cannot run.

    The backend that runs is the route's, else the first profile's
    ``model_type`` (a multi-profile route runs one backend for all its
    profiles); it must be able to segment every profile.  Fallbacks are not
    required to: a fallback that cannot serve a profile is skipped at run time
    with the reason.
    """
    first = backend or profiles[0].model_type
    problems = []
    for profile in profiles:
        why = cannot_segment(first, profile)
        if why is not None:
            problems.append(f"backend {first.value} cannot segment profile {profile.organ}: {why}")
    return problems
