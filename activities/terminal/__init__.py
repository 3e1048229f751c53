"""Running commands on the worker: in a pseudo-terminal or on plain pipes.

Where to look:

    runner.py      ``run_command``: one command to completion, timeout or
                   cancellation; what the command activity (``commands.py``) calls
    policy.py      ``CommandPolicy``: what may run (LLMMIXER_PTY_*), its
                   environment, cwd and launcher
    mode.py        ``TerminalCapability``: whether this worker has ptys
    pty_child.py   starting a command on a new pty (``setsid --ctty``), off the loop
    pipe_child.py  starting a command on pipes under a supervisor
    reaper.py      that supervisor (a script run with ``python -I -S``)
    child.py       ``Child``: a started command's pid and fds, read and written
                   on the event loop
    groups.py      signalling and killing a command's process group
    text.py        ANSI stripping, line endings, head + tail bounding
    respond.py     respond rules (RE2) answering a command's prompts
    errors.py      ``CommandRefusedError``

Nothing is re-exported here: import from the module that defines a name, so
importing one piece (the supervisor's ``group_alive``, the policy) does not
start the rest.
"""
