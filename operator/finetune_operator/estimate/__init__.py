"""Pre-flight estimates: will a stage fit on its GPUs, how many steps, how long -- without loading a model.

Pure (no torch, no LLaMA-Factory, no cluster), so the renderer's tests, ``ftctl plan`` and the preflight pod
share it. Modules: :mod:`.shape` (config.json -> sizes and parameter counts), :mod:`.settings` (a stage's
training settings), :mod:`.memory` (the per-GPU peak and its breakdown), :mod:`.gpus` (GPU table),
:mod:`.data` (the data check's result shape), :mod:`.plan` (verdict, suggestion, steps, duration),
:mod:`.report` (text and JSON output).
"""
