"""One handler per kind of step, run by ``runner.run_step`` inside ``MixerWorkflow``.

Handlers interpret a step: they render its templates, call its activities
and return an outcome. They change the run's state only through ``RunState``
(``workflows/dag.py``), which alone sets a step's status.
"""
