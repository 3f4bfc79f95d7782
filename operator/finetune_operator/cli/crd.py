"""``ftctl crd``: print the FineTuneJob CustomResourceDefinition generated from the API types.

The committed ``crds/finetune.dev_finetunejobs.yaml`` is exactly this output (a test checks it), so
``ftctl crd | kubectl apply -f -`` and applying the committed file are the same thing.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from finetune_operator.crd import build_crd


class _Dumper(yaml.SafeDumper):
    """Block sequences indented under their key (yamllint's default style) and no ``&id`` aliases."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)

    def ignore_aliases(self, data: object) -> bool:
        return True


def render_yaml() -> str:
    """The CRD as YAML text (insertion order kept: it reads like the types)."""
    return yaml.dump(
        build_crd(), Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=False, default_flow_style=False
    )


def _run(args: argparse.Namespace) -> int:
    sys.stdout.write(render_yaml())
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(func=_run)
