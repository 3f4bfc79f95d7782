"""What worker pods run: ``ftctl worker download|train|merge|progress``.

The same code runs in pods (rendered by :mod:`finetune_operator.render`) and on a laptop (``ftctl run --local``):
only the paths in the generated LLaMA-Factory configs differ. Modules:

- :mod:`.envmap`   distributed environment of each backend -> LLaMA-Factory's launcher variables (pure);
- :mod:`.markers`  completion markers written atomically, so a finished step is never redone;
- :mod:`.process`  the LLaMA-Factory child process: signal forwarding, output tail, failure diagnosis;
- :mod:`.progress` following ``trainer_log.jsonl`` and reporting it (log lines, FineTuneJob status);
- :mod:`.download`, :mod:`.train`, :mod:`.merge`  the steps.
"""
