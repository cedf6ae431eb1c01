"""The `melo-ray` command line: edit, generate, eval, serve, data convert, job bulk-edit, demo."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from melo_ray import operations
from melo_ray.backbones import load_backbone
from melo_ray.cli.demo import run_demo
from melo_ray.cluster import init_ray
from melo_ray.config import ConfigError, load_config, with_overrides
from melo_ray.data import CONVERTERS, convert
from melo_ray.editors.loading import load_editor
from melo_ray.editors.registry import build_editor, editor_names
from melo_ray.evaluation import RESULT_FILES, EvalPlan, evaluate, results_table, write_results
from melo_ray.evaluation_tracking import log_results  # imports mlflow only when it logs
from melo_ray.records import RecordError, read_edit_records, read_prompts, write_parquet
from melo_ray.snapshots import SnapshotError, check_editor, read_manifest
from melo_ray.training import length_error
from pipelines.bulk_edit.cli import add_arguments, run as run_bulk_edit
from pipelines.bulk_edit.job import JobError

log = logging.getLogger("melo_ray.cli")

ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "smollm2-135m.yaml"
DEFAULT_NQ = ROOT.parent / "shared" / "data" / "nq-open" / "NQ-open.dev.jsonl"


def _editor_from(args: argparse.Namespace):
    if getattr(args, "snapshot", None):
        return load_editor(args.snapshot)
    config = load_config(args.config)
    return build_editor(config.editor, config)


def cmd_edit(args: argparse.Namespace) -> int:
    import hashlib

    from tqdm import tqdm

    config = with_overrides(load_config(args.config), args.set)
    if args.editor:
        config = config.model_copy(update={"editor": args.editor})
    records = read_edit_records(args.edits)  # the whole file is validated before any training
    if not records:
        raise RecordError(str(args.edits), None, None, "no records")
    for row, record in enumerate(records):
        if too_long := length_error(record, config.train.max_text_chars):
            raise RecordError(str(args.edits), row, *too_long)
    digest = hashlib.sha256(Path(args.edits).read_bytes()).hexdigest()
    size = args.batch_size or config.train.batch_size
    done = 0
    out = Path(args.out)
    if args.set and (args.resume or args.resume_from):
        raise ConfigError("--set applies to a fresh run; a resumed snapshot keeps the config it was written with")
    if args.resume and (out / "manifest.json").is_file():
        job = read_manifest(out).get("job") or {}
        if job.get("edits_sha256") != digest or job.get("batch_size") != size:
            raise SnapshotError(f"{out}: was written from another edit file or batch size; cannot resume it")
        editor = load_editor(out)
        done = int(job["rows_done"] if "rows_done" in job else job["records_done"])  # records_done: older snapshots' name
        print(f"resuming {out}: {done} of {len(records)} edits already applied", file=sys.stderr)
    elif args.resume_from:
        editor = load_editor(args.resume_from)
    else:
        editor = build_editor(config.editor, config)
    check_editor(editor.name, config.editor, str(args.resume_from or out), "this run asks for the latter")
    batches = [records[i : i + size] for i in range(done, len(records), size)]
    started = time.perf_counter()
    for batch in tqdm(batches, desc="edit batches", unit="batch", disable=args.quiet):
        editor.edit(batch)
        done += len(batch)
        # atomic: a crash leaves the last whole batch published, with how far the job got
        editor.save(out, job={"edits_sha256": digest, "batch_size": size, "rows_done": done})
    minutes = (time.perf_counter() - started) / 60
    applied = sum(len(b) for b in batches)
    stats = editor.stats()
    counters = " ".join(f"{k}={v}" for k, v in stats.items() if k not in ("edits", "extra_parameters"))
    print(
        f"editor={editor.name} edits={applied} {counters} "
        f"edits_per_min={applied / max(minutes, 1e-9):.1f} snapshot={out} version={editor.version}"
    )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    if not args.snapshot and not (args.base and args.config):
        raise ConfigError("generate needs --snapshot DIR, or --base with --config CONFIG")
    prompts = read_prompts(args.prompts)
    editor = _editor_from(args)
    results = editor.generate(prompts, args.max_new_tokens, base=args.base)
    for item in results:
        row = {
            "prompt": item.prompt,
            "output": item.output,
            "block": item.block,
            "snapshot_version": None if args.base else editor.version,
        }
        print(json.dumps(row) if args.json else f"{item.prompt!r} -> {item.output!r} (block {item.block})")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    result = convert(args.format, args.input, limit=args.limit)
    write_parquet(result.records, args.out)
    for index, reason in result.skipped:
        print(f"skipped record {index}: {reason}", file=sys.stderr)
    print(f"converted={len(result.records)} skipped={len(result.skipped)} out={args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json as _json

    config = with_overrides(load_config(args.config), args.set)
    names = [n.strip() for n in args.editors.split(",") if n.strip()]
    unknown = [n for n in names if n not in editor_names()]
    if unknown:
        raise ConfigError(f"--editors: unknown editor(s) {unknown}; choose from {list(editor_names())}")
    records = read_edit_records(args.edits)[: args.n_edits]
    if len(records) < args.n_edits:
        log.warning("only %d records in %s (asked for %d)", len(records), args.edits, args.n_edits)
    nq: list[str] = []
    locality = Path(args.locality) if args.locality else DEFAULT_NQ
    if locality.is_file():
        nq = [_json.loads(line)["question"] for line in locality.read_text().splitlines() if line.strip()]
        nq = nq[: args.n_locality]
    elif args.locality:
        raise FileNotFoundError(f"--locality: {locality} not found")
    plan = EvalPlan(batch_size=args.batch_size or config.train.batch_size, every=args.every,
                    max_new_tokens=args.max_new_tokens or config.generate.max_new_tokens,
                    sample=args.sample, sample_seed=args.sample_seed)
    rows = []
    for name in names:
        editor = build_editor(name, config, load_backbone(config.backbone))  # a fresh backbone each
        if args.chat:  # every metric through the chat template; routing still reads the raw question
            editor.backbone.prompt_view = "chat"
        rows.append(evaluate(editor, records, nq, plan, progress=not args.quiet))
    meta = {"config": str(args.config), "overrides": list(args.set), "chat": args.chat, "data": str(args.edits), "n_edits": len(records),
            "batch_size": plan.batch_size, "locality": str(locality) if nq else None, "n_locality": len(nq),
            "sample": args.sample, "sample_seed": args.sample_seed,
            "resolved_config": config.model_dump(mode="json")}  # the settings as run, whatever the file says later
    write_results(rows, Path(args.out), meta)
    print(results_table(rows), end="")
    if args.mlflow_experiment:
        ids = log_results(Path(args.out), args.mlflow_experiment, args.mlflow_uri)
        print(f"MLflow: {len(ids)} editor run(s) in experiment {args.mlflow_experiment!r}")
    print("results: " + ", ".join(str(Path(args.out) / name) for name in RESULT_FILES))
    return 0


def cmd_eval_log(args: argparse.Namespace) -> int:
    for folder in args.folders:
        ids = log_results(Path(folder), args.experiment, args.mlflow_uri)
        print(f"{folder}: {len(ids)} editor run(s) logged to {args.experiment!r}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import ray

    from melo_ray.serving.app import ServeSettings, run_http  # Ray Serve and FastAPI: for `serve` only

    settings = ServeSettings(
        snapshots=args.snapshots, config=args.config, replicas=args.replicas, replica_cpus=args.replica_cpus,
        poll_interval_s=args.poll_interval, model_name=args.model_name,
    )
    init_ray()
    print(f"serving {args.snapshots} on http://{args.host}:{args.port} ({args.replicas} replicas); Ctrl-C stops",
          file=sys.stderr)
    try:
        run_http(settings, args.host, args.port, blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        ray.shutdown()
    return 0


def _print(rows, as_json: bool, line) -> None:
    for row in rows:
        print(json.dumps(row, ensure_ascii=False) if as_json else line(row))


def _ids(args: argparse.Namespace) -> list[str]:
    ids = [i.strip() for i in (args.ids or "").split(",") if i.strip()]
    if args.ids_file:
        ids += [line.strip() for line in Path(args.ids_file).read_text().splitlines() if line.strip()]
    if not ids:
        raise ConfigError("give the edits to revert with --ids a,b or --ids-file FILE (one id a line)")
    return ids


def cmd_edits(args: argparse.Namespace) -> int:
    if args.edits_command == "list":
        _print(operations.list_edits(args.store, args.contains), args.json,
               lambda e: f"{e['id']}\tv{e['version']}\tblock {e['block']}\t{e['prompt']!r} -> {e['target']!r}")
    elif args.edits_command == "explain":
        print(json.dumps(operations.explain(args.store, args.prompt), ensure_ascii=False))
    else:
        result = operations.revert(args.store, _ids(args), break_lock=args.break_lock)
        print(json.dumps(result))
    return 0


def cmd_store(args: argparse.Namespace) -> int:
    command = args.store_command
    if command == "versions":
        _print(operations.versions(args.store), args.json,
               lambda v: f"v{v['version']}\tedits={v.get('edits')}\t{'LATEST ' if v.get('latest') else ''}"
                         f"{'PINNED ' if v.get('pinned') else ''}{v.get('made_by') or ''}")
    elif command == "diff":
        print(json.dumps(operations.diff(args.store, args.old, args.new), ensure_ascii=False))
    elif command == "rollback":
        print(json.dumps(operations.rollback(args.store, args.to, break_lock=args.break_lock)))
    elif command == "compact":
        print(json.dumps(operations.compact(args.store, break_lock=args.break_lock)))
    elif command == "pin":
        operations.pin(args.store, args.version)
        print(json.dumps({"pinned": args.version}))
    else:
        operations.unpin(args.store)
        print(json.dumps({"pinned": None}))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    print(json.dumps(operations.export(args.store, args.out, args.format)))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(Path(args.data), args.n, args.config, Path(args.out))


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one config field (value read as YAML), e.g. elder.replay=50; repeatable")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="melo-ray", description="Lifelong model editing with MELO.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    edit = sub.add_parser("edit", help="apply an edit file (Parquet or JSONL) and write a snapshot")
    edit.add_argument("--config", required=True)
    _add_overrides(edit)
    edit.add_argument("--edits", required=True, help="Parquet or JSONL with prompt, target, ...")
    edit.add_argument("--out", required=True, help="snapshot folder to write (replaced atomically)")
    edit.add_argument("--batch-size", type=int, default=None, help="edits per block (default: config)")
    edit.add_argument("--editor", choices=editor_names(), help="override the config's `editor`")
    edit.add_argument("--resume-from", default=None, help="start from this snapshot instead of the base")
    edit.add_argument("--resume", action="store_true",
                      help="continue an interrupted run: skip the edits --out already holds from this file")
    edit.add_argument("--quiet", action="store_true", help="no progress bar")
    edit.set_defaults(func=cmd_edit)

    gen = sub.add_parser("generate", help="greedy outputs for prompts, routed by the neuron index")
    gen.add_argument("--snapshot", default=None)
    gen.add_argument("--config", default=None, help="with --base: the backbone to run")
    gen.add_argument("--base", action="store_true", help="run the unedited model")
    gen.add_argument("--prompts", required=True, help="JSONL of {\"prompt\": ...} (or Parquet)")
    gen.add_argument("--max-new-tokens", type=int, default=None)
    gen.add_argument("--json", action="store_true", help="one JSON object per line")
    gen.set_defaults(func=cmd_generate)

    data = sub.add_parser("data", help="data tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    conv = data_sub.add_parser("convert", help="convert a public data set into an edit stream")
    conv.add_argument("--format", required=True, choices=sorted(CONVERTERS))
    conv.add_argument("--in", dest="input", required=True)
    conv.add_argument("--out", required=True, help="Parquet file to write")
    conv.add_argument("--limit", type=int, default=None)
    conv.set_defaults(func=cmd_convert)

    ev = sub.add_parser("eval", help="lifelong-editing evaluation of several editors on one edit stream")
    ev.add_argument("--config", required=True)
    _add_overrides(ev)
    ev.add_argument("--edits", required=True, help="Parquet or JSONL edit records (see `data convert`)")
    ev.add_argument("--n-edits", type=int, required=True, help="T: edits applied in order")
    ev.add_argument("--editors", default="melo,grace,lora", help=f"comma-separated: {', '.join(editor_names())}")
    ev.add_argument("--out", required=True, help="folder for results.json, results.md, curves.png")
    ev.add_argument("--locality", default=None, help="NQ-open JSONL for easy locality (default: shared data)")
    ev.add_argument("--n-locality", type=int, default=100)
    ev.add_argument("--batch-size", type=int, default=None)
    ev.add_argument("--every", type=int, default=None, help="also measure every K edits (curves)")
    ev.add_argument("--max-new-tokens", type=int, default=None)
    ev.add_argument("--sample", type=int, default=None,
                    help="measure quality on this many of the T records, drawn at random before editing "
                         "(every record is still applied in order; the --locality questions are asked whole, so "
                         "they weigh more in locality_nq than in a full run); default: all")
    ev.add_argument("--sample-seed", type=int, default=0)
    ev.add_argument("--chat", action="store_true",
                    help="ask every prompt (edits, rephrasings, locality) as a user turn of the chat template")
    ev.add_argument("--quiet", action="store_true")
    ev.add_argument("--mlflow-experiment", default=None,
                    help="also log the results to this MLflow experiment (one run per editor)")
    ev.add_argument("--mlflow-uri", default=None,
                    help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite in --out)")
    ev.set_defaults(func=cmd_eval)

    evlog = sub.add_parser("eval-log", help="log results folders written by `eval` to MLflow (one run per editor)")
    evlog.add_argument("folders", nargs="+")
    evlog.add_argument("--experiment", required=True)
    evlog.add_argument("--mlflow-uri", default=None,
                       help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite in each folder)")
    evlog.set_defaults(func=cmd_eval_log)

    demo = sub.add_parser("demo", help="edit real zsRE facts into the embedded model and show before/after")
    demo.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="the shared data folder")
    demo.add_argument("--n", type=int, default=8, help="number of zsRE facts to edit")
    demo.add_argument("--config", default=str(DEFAULT_CONFIG))
    demo.add_argument("--out", default="runs/demo")
    demo.set_defaults(func=cmd_demo)

    srv = sub.add_parser("serve", help="serve a snapshot store over HTTP with Ray Serve (hot-swaps new versions)")
    srv.add_argument("--snapshots", required=True,
                     help="snapshot store root, or one snapshot folder from `melo-ray edit --out` (local path or URI)")
    srv.add_argument("--config", default=None, help="editor YAML, to serve the base model until a snapshot exists")
    srv.add_argument("--replicas", type=int, default=1)
    srv.add_argument("--replica-cpus", type=float, default=1.0)
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--poll-interval", type=float, default=1.0, help="seconds between checks for a new version")
    srv.add_argument("--model-name", default="melo-ray", help="the `model` the OpenAI-compatible route answers to")
    srv.set_defaults(func=cmd_serve)

    edits = sub.add_parser("edits", help="inspect or revert the edits of a snapshot store")
    edits_sub = edits.add_subparsers(dest="edits_command", required=True)
    listing = edits_sub.add_parser("list", help="id, prompt, target, block, version added")
    listing.add_argument("--store", required=True, help="snapshot store (or one snapshot folder)")
    listing.add_argument("--contains", default=None, help="only edits whose id, prompt or target holds this text")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    why = edits_sub.add_parser("explain", help="which edit would fire for a prompt, and why")
    why.add_argument("--store", required=True)
    why.add_argument("--prompt", required=True)
    undo = edits_sub.add_parser("revert", help="publish a new version without these edits")
    undo.add_argument("--store", required=True)
    undo.add_argument("--ids", default=None, help="comma-separated edit ids")
    undo.add_argument("--ids-file", default=None, help="a file of edit ids, one a line")
    undo.add_argument("--break-lock", action="store_true", help="take the store from a writer that is dead")
    for parser_ in (listing, why, undo):
        parser_.set_defaults(func=cmd_edits)

    store = sub.add_parser("store", help="versions, diff, rollback, pin, compact")
    store_sub = store.add_subparsers(dest="store_command", required=True)
    vers = store_sub.add_parser("versions", help="the versions a store holds")
    vers.add_argument("--json", action="store_true")
    dif = store_sub.add_parser("diff", help="edits added and removed between two versions")
    dif.add_argument("--from", dest="old", type=int, required=True)
    dif.add_argument("--to", dest="new", type=int, required=True)
    back = store_sub.add_parser("rollback", help="publish a new version equal to an older one")
    back.add_argument("--to", type=int, required=True)
    back.add_argument("--break-lock", action="store_true")
    comp = store_sub.add_parser("compact", help="drop blocks no live edit uses (same outputs, smaller snapshot)")
    comp.add_argument("--break-lock", action="store_true")
    pin = store_sub.add_parser("pin", help="replicas serve this version until unpinned")
    pin.add_argument("--version", type=int, required=True)
    unpin = store_sub.add_parser("unpin", help="replicas follow the latest version again")
    for parser_ in (vers, dif, back, comp, pin, unpin):
        parser_.add_argument("--store", required=True, help="snapshot store root (local path or URI)")
        parser_.set_defaults(func=cmd_store)

    exp = sub.add_parser("export", help="write a store's blocks as standard PEFT LoRA adapters + a routing file")
    exp.add_argument("--store", required=True, help="snapshot store (or one snapshot folder)")
    exp.add_argument("--format", default="peft", choices=["peft"])
    exp.add_argument("--out", required=True)
    exp.set_defaults(func=cmd_export)

    job = sub.add_parser("job", help="distributed jobs on Ray")
    job_sub = job.add_subparsers(dest="job_command", required=True)
    bulk = job_sub.add_parser("bulk-edit", help="stream an edit file through the Ray bulk-edit job (resumable)")
    add_arguments(bulk)
    bulk.set_defaults(func=run_bulk_edit)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (RecordError, ConfigError, SnapshotError, JobError, FileNotFoundError, KeyError, ValueError,
            NotImplementedError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"melo-ray: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
