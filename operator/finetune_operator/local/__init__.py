"""Run a FineTuneJob on this machine (``ftctl run --local``) with the same worker code the pods run.

Also builds the tiny demo model and datasets (:mod:`finetune_operator.local.tinymodel`) that the README demo,
the tests and the benchmark use, because no model hub is reachable where those run.
"""
