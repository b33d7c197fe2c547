"""Benchmarks: acall measured side by side with pynenc 0.4.0 and rustvello 0.9.1.

Run them with ``bench/run`` (it builds ``bench/.venv`` with the anchors and acall, then
runs ``python -m bench``). They are not part of the test suite and never run as timed
tests.

Every figure is one printed line: acall's value, the anchor's value measured in the same
rounds of the same process, their ratio and, when the figure has one, its target::

    args_id    3 small args      acall  1.23 M/s   pynenc  0.21 M/s   ratio 5.86x  (target >= 5x) OK

``bench/run --help`` lists the options (``--only NAME``, ``--quick``, ``--json PATH``,
``--list``); the method (best of N interleaved rounds) is described in
:mod:`bench.harness`.

Adding a group: create ``bench/bench_<topic>.py`` and register one or more generator
functions with :func:`bench.harness.group`; each receives the run's
:class:`~bench.harness.Settings` and yields :class:`~bench.harness.Figure` records (build
them from :func:`~bench.harness.measure` timings with :func:`~bench.harness.compare`).
Modules named ``bench_*`` are discovered and imported automatically. Import anchor
packages inside the group function, so listing groups works without them.

``python -m bench.soak`` is not a group: it is the soak (many invocations through Redis,
every result checked, peak RSS of each process), which needs only acall and redis-py;
see :mod:`bench.soak`.
"""
