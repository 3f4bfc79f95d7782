"""``ftctl worker``: the entry point of worker pods (``download``, ``preflight``, ``train``, ``merge``, ``eval``,
``publish``, ``answer``, ``progress``).

Exit codes (see :mod:`finetune_operator.errors`): 0 done (or already done), 1 an input/output error on a volume
(read-only, full; the message names the file), 3 bad data, 4 model missing,
5 download failed, 6 out of memory, 7 training failed, 8 bad distributed environment, 9 evaluation failed,
10 publishing failed, 12 will not fit (preflight), 128+N stopped by signal N (resumable). The message of a
failure is also written to the container's termination message file so that ``kubectl describe`` and the
operator show it without reading logs; ``eval`` and ``publish`` write their result there on success (one JSON
line). ``answer`` writes its verdict there (``{"answer": "ok"}`` or ``{"answer": "failed", "detail": ...}``)
and exits 0 or 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path

from finetune_operator.errors import WorkerError
from finetune_operator.worker.envmap import BACKENDS

#: Kubernetes reads a container's termination message from here (terminationMessagePath).
TERMINATION_LOG = "/dev/termination-log"
#: What the worker creates on the shared volumes is group-writable: the pods of one job run as different users
#: (T9k DeepSpeedJob pods as root, the others as 65532, with fsGroup 65532 and setgid folders), and a later step
#: writes next to what an earlier one created (the merge into ``<output>/<job>/`` after training). With the
#: usual 022, folders made by root training pods left the non-root merge pod unable to write (found by running
#: the pods in their images).
UMASK = 0o002


def _setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("FT_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _termination_message(message: str) -> None:
    path = os.environ.get("FT_TERMINATION_LOG", TERMINATION_LOG)
    try:
        if os.path.exists(path) and os.access(path, os.W_OK):
            Path(path).write_text(message[:4000], encoding="utf-8")
    except OSError:
        return


def _run(step: str, args: argparse.Namespace) -> int:
    os.umask(UMASK)
    _setup_logging()
    try:
        if step == "download":
            return _download(args)
        if step == "train":
            return _train(args)
        if step == "merge":
            return _merge(args)
        if step == "preflight":
            from finetune_operator.worker.preflight import run_in_pod

            return run_in_pod(args.config)
        if step == "publish":
            return _publish(args)
        if step == "eval":
            return _eval(args)
        if step == "answer":
            return _answer(args)
        if step == "stop":
            return _stop(args)
        return _progress(args)
    except WorkerError as exc:
        msg = f"{step} failed: {exc}"
        print(f"error: {msg}", file=sys.stderr)
        _termination_message(msg)
        return exc.exit_code
    except OSError as exc:
        # A read-only or full volume, a file where a folder should be: name the file, never a traceback, and
        # leave the message where ``kubectl describe`` and the operator read it.
        where = f": {exc.filename}" if exc.filename else ""
        msg = f"{step} failed: {exc.strerror or exc}{where}"
        print(f"error: {msg}", file=sys.stderr)
        _termination_message(msg)
        return 1


def _download(args: argparse.Namespace) -> int:
    from finetune_operator.worker.download import run_download
    from finetune_operator.worker.train import load_config

    cfg = load_config(args.config) if args.config else {}
    source = args.source or cfg.get("source")
    model_dir = args.model_dir or cfg.get("local_dir") or cfg.get("model_dir")
    if not source or not model_dir:
        raise WorkerError("download needs a source and a model_dir (in --config or as --source/--model-dir)")
    res = run_download(
        source=str(source),
        model_dir=str(model_dir),
        hub=str(args.hub or cfg.get("hub") or "huggingface"),
        revision=args.revision or cfg.get("revision"),
    )
    print(f"model: {res.model_dir}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from finetune_operator.worker.train import run_train

    # DeepSpeed's launcher appends --local_rank=N after everything else (LOCAL_RANK carries it too).
    overrides = [o for o in args.overrides if o != "--" and not o.startswith(("--local_rank", "--local-rank"))]
    res = run_train(
        args.config,
        backend=args.backend or os.environ.get("FT_BACKEND") or "job",
        stage=args.stage,
        overrides=overrides,
        echo=sys.stdout,
    )
    if res.primary:
        print(f"output: {res.output_dir}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from finetune_operator.worker.merge import run_merge

    res = run_merge(args.config, echo=sys.stdout)
    print(f"merged: {res.export_dir}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from finetune_operator.worker.evaluate import run_eval
    from finetune_operator.worker.train import load_config

    res = run_eval(load_config(args.config), echo=sys.stdout)
    for name, value in sorted(res.metrics.items()):
        print(f"metric: {name} = {value:.6g}")
    # The operator reads the metrics from the termination message (see worker.evaluate).
    _termination_message(json.dumps({"metrics": res.metrics}, sort_keys=True))
    return 0


def _publish(args: argparse.Namespace) -> int:
    import json

    from finetune_operator.worker.publish import load_config, run_publish

    res = run_publish(load_config(args.config))
    for dest in res.destinations:
        print(f"published: {dest['url']} ({dest['uploaded']} uploaded, {dest['skipped']} unchanged)")
    published = [{k: d[k] for k in ("name", "type", "url", "digest") if d.get(k)} for d in res.destinations]
    _termination_message(json.dumps({"published": published}, sort_keys=True))
    return 0


def _answer(args: argparse.Namespace) -> int:
    from finetune_operator.chatcheck import verdict_message
    from finetune_operator.worker.answer import run_answer

    answer = run_answer(args.url, args.model, timeout=args.timeout)
    print(f"answer: ok (model {args.model!r})" if answer.ok else f"answer: failed: {answer.detail}")
    # The operator reads the verdict from the termination message (see worker.answer).
    _termination_message(verdict_message(answer))
    return 0 if answer.ok else 1


def _stop(args: argparse.Namespace) -> int:
    from finetune_operator.worker.stopping import stop_running

    return 1 if stop_running(os.environ) else 0


def _progress(args: argparse.Namespace) -> int:
    from finetune_operator.worker import markers
    from finetune_operator.worker.progress import TRAINER_LOG, StatusReporter, TrainerLogFollower

    out = Path(args.output_dir)
    stage = args.stage or os.environ.get("FT_STAGE") or out.name
    follower = TrainerLogFollower(out / TRAINER_LOG)
    reporter = StatusReporter.from_env(stage) if args.report else None
    stop = threading.Event()
    while True:
        for p in follower.poll():
            print(p.line(stage), flush=True)
            if reporter is not None:
                reporter.report(p)
        if not args.follow or markers.read_marker(out) is not None:
            break
        if stop.wait(args.interval):
            break
    if reporter is not None and follower.last is not None:
        reporter.report(follower.last, force=True)
    if follower.last is None:
        print(f"[{stage}] no progress logged yet in {out / TRAINER_LOG}", file=sys.stderr)
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="step", metavar="STEP", required=True)

    d = sub.add_parser("download", help="download the base model from a hub into the model volume, once")
    d.add_argument("--config", help="download.yaml (source, hub, revision, local_dir)")
    d.add_argument("--source", help="hub id, e.g. Qwen/Qwen2-0.5B-Instruct")
    d.add_argument("--hub", choices=("huggingface", "modelscope"))
    d.add_argument("--revision")
    d.add_argument("--model-dir")
    d.set_defaults(func=lambda a: _run("download", a))

    t = sub.add_parser("train", help="run one LLaMA-Factory training stage (resumes; no-op when complete)")
    t.add_argument("--config", required=True, help="the stage's LLaMA-Factory YAML")
    t.add_argument(
        "--backend",
        choices=BACKENDS,
        help="workload kind whose distributed environment to map (default: $FT_BACKEND or job)",
    )
    t.add_argument("--stage", help="stage name for progress reports (default: $FT_STAGE or the output folder)")
    # DeepSpeed's launcher appends --local_rank=N to the command it starts; the value is in LOCAL_RANK too.
    t.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, help=argparse.SUPPRESS)
    t.add_argument("overrides", nargs=argparse.REMAINDER, help="key=value overrides passed to LLaMA-Factory")
    t.set_defaults(func=lambda a: _run("train", a))

    m = sub.add_parser("merge", help="merge the base model and the adapters (llamafactory-cli export), atomically")
    m.add_argument("--config", required=True, help="merge.yaml")
    m.set_defaults(func=lambda a: _run("merge", a))

    f = sub.add_parser(
        "preflight", help="plan every stage (memory, data, steps) and refuse a job that will not fit (exit 12/3)"
    )
    f.add_argument("--config", required=True, help="preflight.json (the FineTuneJob)")
    f.set_defaults(func=lambda a: _run("preflight", a))
    ev = sub.add_parser("eval", help="evaluate the candidate model (loss, generation metrics, benchmark)")
    ev.add_argument("--config", required=True, help="eval.yaml")
    ev.set_defaults(func=lambda a: _run("eval", a))

    pub = sub.add_parser("publish", help="write the lineage file and publish the model to its destinations")
    pub.add_argument("--config", required=True, help="publish.json")
    pub.set_defaults(func=lambda a: _run("publish", a))

    ans = sub.add_parser(
        "answer",
        help="send one chat completion to a vLLM Service with the API key from $FT_API_KEY; verdict, exit 0/1",
    )
    ans.add_argument(
        "--url", required=True, help="the completions URL, e.g. http://svc.ns.svc:8000/v1/chat/completions"
    )
    ans.add_argument("--model", required=True, help="the served model name")
    ans.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the answer")
    ans.set_defaults(func=lambda a: _run("answer", a))

    st = sub.add_parser(
        "stop",
        help="preStop hook: make this pod's training workers checkpoint and exit, and wait for them "
        "(for pods whose PID 1 is not the worker, e.g. sshd under DeepSpeedJob)",
    )
    st.set_defaults(func=lambda a: _run("stop", a))

    p = sub.add_parser("progress", help="print (and report) the progress of a stage from its trainer log")
    p.add_argument("--output-dir", required=True, help="the stage's output folder")
    p.add_argument("--stage")
    p.add_argument("--follow", action="store_true", help="keep following until the stage is complete")
    p.add_argument("--report", action="store_true", help="also PATCH the FineTuneJob status (in a pod)")
    p.add_argument("--interval", type=float, default=2.0, help=argparse.SUPPRESS)
    p.set_defaults(func=lambda a: _run("progress", a))
