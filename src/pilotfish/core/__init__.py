"""The pure workflow core: events in, commands out; no processes, sockets, clocks or files.

``states`` holds the task state enum and its transition table, ``policy`` the
retry/backoff/poison rules and when to give up on a silent backend, as plain data,
``workflow`` the state machine that owns the task graph, attempts (whose ids are
fencing tokens) and failure propagation, ``ledger`` the attempt ledger every backend
uses, ``drain`` the bad-node rule the workflow feeds, ``machine`` what every state
machine shares: one ``handle(stimulus)``, a bounded story of recent stimuli for its
errors, and a ``validate()`` of its invariants that the tests run after every step.
The session feeds the workflow events from a backend and executes the commands it
returns.
"""
