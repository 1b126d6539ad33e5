"""``edge-runtime`` command line.

Exit codes: 0 success, 1 a file could not be processed (``process``) or the
journal is refused (``journal check``), 2 bad configuration, model bundle or
journal at start (the message says what to fix).

Every error the runtime raises on purpose (a missing file, a bad setting, an
engine not installed) is one message for the admin, ``error: ...`` and
``→ what to do`` (``process``: one JSON line per file), not a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .bundle import BundleTrust, default_bundle_path, load_bundle
from .config import ENV_PREFIX, load_config
from .errors import (
    ConfigError,
    EdgeRuntimeError,
    EngineNotInstalled,
    InputError,
    JournalError,
    NotARegularFile,
    UnreadableFile,
)
from .logs import configure_logging

if TYPE_CHECKING:
    from .journal import JournalReport

__all__ = ["main"]

_DESCRIPTION = """\
HealthDiag edge runtime: watches an inbox folder for chest X-rays (DICOM, PNG,
JPEG), runs the INT8 model of a verified model bundle on each one, and publishes
one JSON result per scan over MQTT (QoS 1). NOT FOR DIAGNOSTIC USE.
"""

_EPILOG = f"""\
configuration:
  A YAML/JSON file with PascalCase keys (the same keys as the Greengrass
  component's configuration), e.g.

    Inbox: {{Path: inbox, QuarantinePath: quarantine, SettleSeconds: 1.0}}
    Mqtt:  {{Host: localhost, Port: 1883, TopicPrefix: healthdiag/edge}}

  Any key can be overridden from the environment:
    {ENV_PREFIX}MQTT__PORT=8883  {ENV_PREFIX}INBOX__PATH=/data/inbox
  Run 'edge-runtime config check -c FILE' to see every key and its effective
  value (empty strings mean unset).

examples:
  edge-runtime run --config edge.yaml
  edge-runtime journal check --config edge.yaml
  edge-runtime journal backup --config edge.yaml /mnt/backup/
  edge-runtime process scan.dcm IM-0001.jpeg
  edge-runtime sample inbox/                   # two sample scans to try the service with
  edge-runtime model info
  mosquitto_sub -t 'healthdiag/edge/#' -v      # watch results and status
"""


def _add_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        metavar="FILE",
        help="YAML/JSON configuration file (default: built-in defaults + environment)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-runtime",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser(
        "run",
        help="run the service: watch the inbox and publish results",
        description="Watch Inbox.Path, process each complete file once, publish results to "
        "<Mqtt.TopicPrefix>/results and a retained status to <Mqtt.TopicPrefix>/status. Bad "
        "files are moved to Inbox.QuarantinePath with NAME.error.json. Stop with Ctrl-C or "
        "SIGTERM; scans in progress are finished first. Refused (exit status 2) while another "
        "service runs with the same journal, and on the problems 'config check' reports.",
    )
    _add_config_arg(run)
    run.add_argument(
        "--new-journal",
        action="store_true",
        help="start over with a new, empty journal when the existing one is refused (missing, "
        "empty, replaced or damaged): its files are moved aside to "
        "NAME.old-<UTC time> (never deleted) and a WARNING is logged; results not yet delivered "
        "in it are NOT sent. Restore a backup instead if you have one. A healthy journal is kept "
        "(the flag is then ignored).",
    )

    process = sub.add_parser(
        "process",
        help="analyse files once and print one result JSON per line",
        description="Analyse the given files with the configured model and print one result "
        "JSON per line on stdout. A file that cannot be analysed (missing, a folder, unreadable, "
        "not an image, ...) gets one error JSON line on stderr (file, code, error, action) and "
        "the others are still analysed. Nothing is published, moved or journaled. Exit status 1 "
        "if any file failed.",
    )
    _add_config_arg(process)
    process.add_argument(
        "files", nargs="+", type=Path, metavar="FILE", help="scan files (DICOM, PNG, JPEG); not folders"
    )

    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    check = config_sub.add_parser(
        "check",
        help="validate a configuration and print the effective values",
        description="Validate the configuration file (given as -c/--config FILE or as FILE; "
        "none: the built-in defaults) plus environment overrides, and print the effective "
        "configuration as YAML, every key with its value (an empty string means unset, as in the "
        "file), or list exactly which settings are wrong (exit status 2).",
    )
    _add_config_arg(check)
    check.add_argument("file", type=Path, nargs="?", metavar="FILE", help="the same as -c FILE")
    config_sub.add_parser(
        "reference",
        help="print the reference of every setting (Markdown)",
        description="Print every configuration key with its type, default, limits and meaning, "
        "written from the typed configuration of this version (docs/configuration.md is this "
        "output).",
    )

    schema = sub.add_parser(
        "schema",
        help="print the JSON Schema of the result message",
        description="Print the JSON Schema of the result message every sink publishes, generated "
        "from the runtime's typed result (edge_runtime/schemas/result-v1.schema.json is this output): "
        "give it to the hospital system that subscribes, to validate what it receives.",
    )
    schema.add_argument("message", choices=["result"], help="which message")

    health = sub.add_parser(
        "health",
        help="is the service alive? (for ops scripts and Greengrass)",
        description="Read the health file the running service rewrites every heartbeat "
        "(Health.File) and print it. Exit status 0 when the service is online and the file "
        "is fresh (younger than three heartbeats), 1 otherwise, with the reason.",
    )
    _add_config_arg(health)

    journal = sub.add_parser(
        "journal",
        help="check or back up the results journal",
        description="The journal (Journal.Path, default state/journal.sqlite3) holds every "
        "scan's outcome and the results not yet delivered. Its id is kept inside it and in "
        "journal.id beside it; the service refuses to start when they disagree or the journal "
        "is missing, empty or damaged, instead of silently losing undelivered results.",
    )
    journal_sub = journal.add_subparsers(dest="journal_command", metavar="SUBCOMMAND", required=True)
    jcheck = journal_sub.add_parser(
        "check",
        help="check integrity and id, print counts (safe while the service runs)",
        description="Run SQLite's integrity check on the journal, compare its id with journal.id "
        "and print the counts: done, quarantined, results awaiting delivery (per sink). Its size "
        "counts the commits still in the NAME-wal file (about what a backup takes); the files on "
        "disk are shown beside it. Only reads; safe while the service runs. Exit status 0 "
        "healthy, 1 the journal would be refused at start (the reason and what to do are "
        "printed), 2 bad configuration.",
    )
    jbackup = journal_sub.add_parser(
        "backup",
        help="copy the journal with SQLite's online backup (safe while the service runs)",
        description="Copy the journal to DEST with SQLite's online backup API: one consistent "
        "snapshot, taken without stopping the service. The copy is integrity-checked, written as "
        "DEST.part and renamed when complete; it carries the journal's id inside it (a backup "
        "has no .id file of its own, and needs none), so it can be restored in place (stop the "
        "service, copy it over Journal.Path, start). An existing DEST file is never overwritten. "
        "Exit status 0 done, 1 failed (the reason is printed).",
    )
    jbackup.add_argument(
        "dest",
        metavar="DEST",
        help="backup file, or a folder: an existing one, or any path ending in / (created); the "
        "file is then named <journal>-<UTC time>.sqlite3",
    )
    for jparser in (jcheck, jbackup):
        _add_config_arg(jparser)
        jparser.add_argument(
            "--journal",
            type=Path,
            metavar="FILE",
            help="journal file (default: Journal.Path of the configuration); e.g. a backup to check",
        )
        jparser.add_argument("--json", action="store_true", help="print the report as JSON")

    sample = sub.add_parser(
        "sample",
        help="write two sample scans (a DICOM and a PNG) to try the service with",
        description="Write two real chest X-rays from the model bundle's reference set to DEST: "
        "the clearest pneumonia case as a DICOM (CR, made-up patient SAMPLE^PAEDIATRIC, age 3) "
        "and the clearest normal case as a PNG, with the answer the model gave on the machine "
        "that built it. The images are de-identified training images credited in the bundle's "
        "model card. Each file is written as NAME.part and renamed when complete, so DEST may "
        "be the service's inbox. Existing sample files are replaced.",
    )
    sample.add_argument("dest", type=Path, metavar="DEST", help="folder to write to, e.g. inbox/")
    sample.add_argument(
        "--bundle",
        type=Path,
        metavar="BUNDLE_DIR",
        help="bundle whose reference images to use (default: Model.BundlePath, else the bundled model)",
    )
    _add_config_arg(sample)

    model = sub.add_parser("model", help="model bundle tools")
    model_sub = model.add_subparsers(dest="model_command", metavar="SUBCOMMAND", required=True)
    info = model_sub.add_parser(
        "info",
        help="verify a model bundle and describe it",
        description="Verify the bundle's signature (against Model.TrustedKeys) and file hashes, "
        "and print who signed it and its manifest summary.",
    )
    info.add_argument(
        "bundle",
        type=Path,
        nargs="?",
        metavar="BUNDLE_DIR",
        help="bundle folder (default: Model.BundlePath, else the bundled model)",
    )
    _add_config_arg(info)
    info.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    verify = model_sub.add_parser(
        "verify",
        help="run the bundle's conformance check on this CPU and print the table",
        description="Load the bundle (hashes verified), run its reference images on the backend "
        "(Model.Backend, or --backend) on this CPU and compare each output with the FP32 "
        "reference probability recorded where the bundle was built: every |p - p_fp32| must be "
        "within the manifest's tolerance and every decision must match (except for references "
        "within the decision margin of the threshold). The service runs the same check whenever "
        "it loads a model and refuses a model that fails it. With --backend all (or Model.Backend "
        "auto), every engine the bundle has a file for and that is installed here is checked; "
        "one that is not installed (LiteRT is an optional extra: pip install '.[litert]') is "
        "skipped with a line saying so. Exit status: 0 passed, 1 failed, 2 the bundle cannot be "
        "loaded, has no reference set, or none of its engines is installed.",
    )
    verify.add_argument(
        "bundle",
        type=Path,
        nargs="?",
        metavar="BUNDLE_DIR",
        help="bundle folder (default: Model.BundlePath, else the bundled model)",
    )
    _add_config_arg(verify)
    verify.add_argument(
        "--backend",
        default=None,
        help="backend to check (default: Model.Backend); 'all' (and Model.Backend auto) checks "
        "every backend the bundle has a model file for that is installed here, and names the "
        "ones skipped",
    )
    verify.add_argument("--json", action="store_true", help="print the reports as JSON")
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from .azure_edge import EdgeHubModule, running_under_iot_edge
    from .greengrass import GreengrassIpc, running_under_greengrass
    from .hosts import ConfigOutcome, Host
    from .service import EdgeService

    host: Host | None = None
    if args.config is None and running_under_iot_edge():
        # Started by Azure IoT Edge: the module twin's desired properties are the source of truth
        # (the same keys as the Greengrass component's configuration), read and watched via edgeHub.
        module = EdgeHubModule()
        try:
            module.connect()
            config = module.load_config()
        except ConfigError as exc:
            # Said where whoever wrote the twin looks, before edgeAgent restarts us.
            module.config_outcome(ConfigOutcome(False, error=f"{exc.code}: {exc.message}"))
            module.flush(5.0)
            module.close()
            raise
        except BaseException:
            module.close()
            raise
        host = module
    elif args.config is None and running_under_greengrass():
        # Started by the Greengrass nucleus: the component configuration is the source
        # of truth, read (and later updated) over IPC.
        greengrass = GreengrassIpc()
        host = greengrass
        config = greengrass.load_config()
        if config.model.bundle_path is None:
            raise ConfigError(
                "Model.BundlePath is empty in the Greengrass configuration, so the runtime would "
                "run the model copy inside its own wheel instead of the deployed model component.",
                action="Set Model.BundlePath to {com.healthdiag.model.PneumoniaCXR:artifacts:"
                "decompressedPath}/pneumonia-cxr (the recipe default) and redeploy.",
            )
    else:
        config = load_config(args.config)
    configure_logging(
        config.logging.level, config.logging.format, redact_names=not config.privacy.log_file_names
    )
    if host is not None:
        logging.getLogger("edge_runtime").info("configuration read from %s", host.name)
    from .journal import InstanceLock, Journal
    from .preflight import require_machine

    # One service per journal, checked first: a second one is refused naming the first's PID,
    # before it could trip over the first's port or broker session.
    try:
        lock = InstanceLock(config.journal.path)
        try:
            # The same checks as 'config check', creating missing folders as the sources do.
            require_machine(config, create=True)
            # --new-journal: a refused journal is moved aside and a new one created (logged).
            journal = Journal(config.journal.path, start_new=args.new_journal, lock=lock)
        except BaseException:
            lock.release()
            raise
        service = EdgeService(config, host=host, journal=journal)
    except BaseException:
        # The host's client has threads of its own: closed, so that the process exits and says why.
        if host is not None:
            host.close()
        raise
    service.run_forever()
    return 0


class _MissingFile(InputError):
    """A file named on the command line does not exist."""

    code = "file_not_found"


def _unreadable(path: Path, exc: OSError) -> InputError:
    """What an admin should read when ``path`` (named on the command line) cannot be opened."""
    if isinstance(exc, FileNotFoundError):
        where = "" if path.is_absolute() else f" (looked for {path.absolute()})"
        return _MissingFile(
            f"{path} does not exist{where}; it was not analysed.",
            action="Check the file name and folder; a relative path is taken from the current folder.",
        )
    if isinstance(exc, PermissionError):
        return UnreadableFile(
            f"{path} cannot be read by this user (uid {os.geteuid()}): {exc.strerror}.",
            action="Run edge-runtime as a user who may read the file, or give this user read access.",
        )
    return UnreadableFile(
        f"{path} cannot be read: {exc.strerror or exc}.",
        action="Check the file and the disk it is on (system log), then try again.",
    )


def _refuse_before_reading(path: Path) -> InputError | None:
    """Why ``path`` is not a scan file (missing, a folder, a pipe...), checked unopened; None if it may be."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        return _unreadable(path, exc)
    if stat.S_ISDIR(mode):
        return NotARegularFile(
            f"{path} is a folder, not a file; nothing in it was analysed.",
            action=f"Name the scan files themselves, e.g. edge-runtime process {path}/*",
        )
    if not stat.S_ISREG(mode):  # a FIFO would block the read for ever
        return NotARegularFile(
            f"{path} is not a regular file (a pipe, device or socket); it was not read.",
            action="Name the scan files themselves (DICOM, PNG, JPEG).",
        )
    return None


def _cmd_process(args: argparse.Namespace) -> int:
    from .pipeline import ScanAnalyzer

    config = load_config(args.config)
    configure_logging("WARNING", config.logging.format)
    analyzer = ScanAnalyzer.from_config(config, create_reference_key=False)
    failures = 0
    try:
        for path in args.files:
            try:
                refused = _refuse_before_reading(path)
                if refused is not None:
                    raise refused
                try:
                    outcome = analyzer.analyze(path, preview_side=0)  # no reports: no heat-map preview
                except OSError as exc:  # removed or made unreadable since the check above
                    raise _unreadable(path, exc) from exc
            except InputError as exc:
                failures += 1
                print(json.dumps({"file": str(path), **exc.to_dict()}), file=sys.stderr, flush=True)
                continue
            print(outcome.result(config.reports.urgent_threshold).payload, flush=True)
    finally:
        analyzer.close()
    return 1 if failures else 0


#: What ``config check`` prints for a password that is set.
_HIDDEN = "<set, not shown>"


def _unset_as_empty(value: object) -> object:
    """``None`` (unset) as ``""``, the spelling the configuration file and recipe use for it."""
    if value is None:
        return ""
    if isinstance(value, dict):
        return {key: _unset_as_empty(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_unset_as_empty(item) for item in value]
    return value


def _cmd_config_check(args: argparse.Namespace) -> int:
    import yaml

    path = args.config or args.file
    if args.config is not None and args.file is not None and args.config.absolute() != args.file.absolute():
        raise ConfigError(
            f"Two different configuration files were given: {args.config} (-c/--config) and "
            f"{args.file} (FILE).",
            action="Give the file once: edge-runtime config check -c FILE (or edge-runtime config "
            "check FILE).",
        )
    config = load_config(path)
    from .preflight import require_machine

    # The start-up checks 'run' makes, creating nothing: folders writable, the DICOM port free.
    require_machine(config, create=False)

    # Unset is written "" (the manuals' and the recipes' spelling), not PyYAML's ''.
    dumper: Any = type("Dumper", (yaml.SafeDumper,), {})
    dumper.add_representer(
        str,
        lambda d, text: d.represent_scalar("tag:yaml.org,2002:str", text, style='"' if text == "" else None),
    )
    print(f"# effective configuration ({path or 'defaults'} + environment): valid")
    print('# "" = unset')
    shown = _unset_as_empty(config.to_pascal_dict())
    mqtt = shown.get("Mqtt") if isinstance(shown, dict) else None
    if isinstance(mqtt, dict) and mqtt.get("Password"):
        mqtt["Password"] = _HIDDEN  # this output is pasted into tickets and chats
    print(yaml.dump(shown, Dumper=dumper, sort_keys=False), end="")
    return 0


#: What to do when the health file's file system is full (``edge-runtime health``).
_DISK_FULL_ACTION = (
    "Free space there (e.g. old report folders in Reports.Path: lower Reports.KeepDays; old logs); "
    "the service writes its health file again at its next heartbeat, and reports resume by themselves. "
    "Its MQTT status topic meanwhile says how it is."
)


def _cmd_health(args: argparse.Namespace) -> int:
    """Healthy (0) or not (1, with why on stderr), from the health file the service rewrites.

    A health file that cannot be read, or whose heartbeat is too old, is checked
    against its file system: when that is full (:func:`.health.disk_full_reason`)
    the answer is "disk full" and what to do, not "hung or stopped".
    """
    from datetime import UTC, datetime

    from .health import disk_full_reason

    config = load_config(args.config)
    path = config.health.file
    try:
        snapshot = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        full = disk_full_reason(path)
        if full:
            print(f"unhealthy: {full}. {_DISK_FULL_ACTION}", file=sys.stderr)
            return 1
        print(
            f"unhealthy: cannot read {path} ({exc}); is the service running with this configuration?",
            file=sys.stderr,
        )
        return 1
    print(json.dumps(snapshot, indent=2))
    written = datetime.strptime(snapshot["timestamp_utc"], "%Y-%m-%dT%H:%M:%S.%fZ")
    age_s = (datetime.now(UTC).replace(tzinfo=None) - written).total_seconds()
    limit_s = 3 * float(snapshot.get("heartbeat_seconds", config.health.heartbeat_seconds))
    if snapshot.get("state") == "offline":
        print(f"unhealthy: the service is offline ({snapshot.get('reason')})", file=sys.stderr)
        return 1
    if age_s > limit_s and (full := disk_full_reason(path)):
        print(
            f"unhealthy: {full} (its last heartbeat is {age_s:.0f} s old, limit {limit_s:.0f} s). "
            f"{_DISK_FULL_ACTION}",
            file=sys.stderr,
        )
        return 1
    if age_s > limit_s:
        print(
            f"unhealthy: no heartbeat for {age_s:.0f} s (limit {limit_s:.0f} s); the service "
            "is hung or stopped",
            file=sys.stderr,
        )
        return 1
    drift = snapshot.get("drift") or {}
    if drift.get("summary"):
        # Said (stdout stays the snapshot's JSON), not failed on: a drift alarm is about the scans
        # a site sends, not the box's health (the nucleus restarts a component whose check fails).
        print(drift["summary"], file=sys.stderr)
        if drift.get("state") == "alarm":
            print(f"DRIFT ALARM: {'; '.join(drift.get('reasons') or [])}", file=sys.stderr)
    if snapshot.get("state") != "online":
        print(f"degraded: {snapshot.get('reason')}", file=sys.stderr)
        return 1
    return 0


def _print_journal_report(report: JournalReport, heading: str, *, backup: bool = False) -> None:
    from .journal import id_path_for

    counts = report.counts
    id_name = id_path_for(report.path).name
    if report.id_file:
        id_line = f"{report.journal_id} (matches {id_name})"
    elif backup and report.journal_id:
        id_line = (
            f"{report.journal_id} (stored inside the copy; a backup has no .id file of its own, "
            "and needs none: restored over Journal.Path, it matches the journal.id there)"
        )
    elif report.journal_id:
        id_line = (
            f"{report.journal_id} (no {id_name} beside it: normal for a backup copy; for the live "
            "journal, after an upgrade from a version without ids or a restore, the service writes "
            f"{id_name} at its next start. Nothing to do)"
        )
    else:
        id_line = (
            "none yet (a journal from a version without ids: the service gives it one at its next "
            "start. Nothing to do)"
        )
    sinks = ", ".join(f"{sink} {n}" for sink, n in report.pending_by_sink.items())
    size = f"{report.size_bytes} bytes"
    if report.wal_bytes:
        size += (
            f"; on disk: {report.path.name} {report.file_bytes} bytes + {report.path.name}-wal "
            f"{report.wal_bytes} bytes of recent commits, copied into it at SQLite's next checkpoint"
        )
    print(f"{heading}: {report.path} ({size})")
    print(f"  id:                {id_line}")
    print(f"  done:              {counts['done']}")
    print(f"  quarantined:       {counts['quarantined']}")
    print(f"  in progress:       {counts['queued'] + counts['processing']} (redone at the next start)")
    print(f"  awaiting delivery: {counts['outbox_pending']}" + (f" ({sinks})" if sinks else ""))


def _cmd_journal(args: argparse.Namespace) -> int:
    from .journal import backup_journal, check_journal

    path = args.journal or load_config(args.config).journal.path
    try:
        if args.journal_command == "check":
            report = check_journal(path)
            heading = "journal healthy"
        else:
            report = backup_journal(path, args.dest)
            heading = f"backup of {Path(path).absolute()} written"
    except JournalError as exc:
        print(f"error: {exc.message}\n→ {exc.action}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        _print_journal_report(report, heading, backup=args.journal_command == "backup")
    return 0


def _cmd_model_info(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    bundle_dir = args.bundle or config.model.bundle_path or default_bundle_path()
    bundle = load_bundle(bundle_dir, trust=BundleTrust.from_config(config.model))
    if args.json:
        print(json.dumps(bundle.manifest.to_json_dict(), indent=2))
        return 0
    m = bundle.manifest
    spec = bundle.preprocessing
    sig = bundle.signature
    if sig.verified:
        signed = f"signed by trusted key {sig.signer}; all {len(m.files)} file hashes verified"
    else:
        signed = (
            f"NOT AUTHENTICATED: {sig.reason}; {len(m.files)} file hashes match a manifest nobody "
            "vouches for (Model.RequireSignature is false)"
        )
    print(f"bundle:        {bundle.path}")
    print(f"signature:     {signed}")
    print(f"model:         {bundle.name} {bundle.version}")
    print(f"labels:        {', '.join(bundle.labels)} (positive: {bundle.positive_label})")
    for art in m.artifacts:
        size = (bundle.path / art.file).stat().st_size / 1e6
        print(f"artifact:      {art.file} [{art.backend}, {art.quantization}, {size:.1f} MB]")
    print(f"input:         {bundle.input_name} {bundle.input_shape} {m.input.dtype}")
    print(
        f"preprocessing: {spec.height}x{spec.width} {spec.resize}, {spec.channels} ch "
        f"{spec.layout}, mean {list(spec.mean)} std {list(spec.std)} "
        f"(sha256 {spec.sha256[:12]}…)"
    )
    op = m.operating_point
    print(f"threshold:     {op.threshold:.4f}  ({op.method or 'method not recorded'})")
    conf = m.conformance
    if conf is not None:
        print(
            f"conformance:   {conf.images} reference images, |p - p_fp32| <= "
            f"{conf.max_abs_diff} on every CPU (run 'edge-runtime model verify' to check this one)"
        )
    else:
        print("conformance:   none (bundle predates 0.2.0): answers on this CPU cannot be checked")
    use = m.intended_use.model_dump(exclude_defaults=True)
    if use:
        print(f"intended use:  {json.dumps(use)}")
    for split, metrics in m.metrics.items():
        shown = ", ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
            for k, v in metrics.items()
            if not isinstance(v, dict | list)
        )
        print(f"metrics/{split}: {shown}")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from .samples import write_samples

    config = load_config(args.config)
    bundle_dir = args.bundle or config.model.bundle_path or default_bundle_path()
    bundle = load_bundle(bundle_dir, trust=BundleTrust.from_config(config.model))
    for sample in write_samples(bundle, args.dest):
        print(
            f"{sample.path}: labelled {sample.label} in the training data; expect "
            f"P({bundle.positive_label}) = {sample.expected:.4f} from model {bundle.name} "
            f"{bundle.version} (threshold {bundle.manifest.threshold:.4f})"
        )
    return 0


def _cmd_model_verify(args: argparse.Namespace) -> int:
    from .backends import AUTO_BACKEND
    from .conformance import verify_backend

    config = load_config(args.config)
    bundle_dir = args.bundle or config.model.bundle_path or default_bundle_path()
    bundle = load_bundle(bundle_dir, trust=BundleTrust.from_config(config.model))
    wanted = args.backend or config.model.backend
    # auto picks among all of them at start-up, so each installed one is worth checking; one
    # that is not installed is skipped (auto skips it too), as a plain 'pip install .' leaves
    # the optional engines out.
    every = wanted in ("all", AUTO_BACKEND)
    backends = list(dict.fromkeys(bundle.backends)) if every else [wanted]
    failed = False
    reports = []
    skipped: list[str] = []
    for name in backends:
        try:
            report = verify_backend(bundle, name, threads=config.model.threads)
        except EngineNotInstalled as exc:
            if not every:
                raise
            skipped.append(name)
            print(
                f"== {bundle.name} {bundle.version}, backend {name}: skipped. {exc.message}\n→ {exc.action}",
                file=sys.stderr if args.json else sys.stdout,
                flush=True,
            )
            continue
        if report is None:
            print(
                f"error: model {bundle.name} {bundle.version} has no conformance reference set "
                "(bundles before 0.2.0); its answers on this CPU cannot be checked.",
                file=sys.stderr,
            )
            return 2
        reports.append(report)
        failed |= not report.passed
        if not args.json:
            print(
                f"== {bundle.name} {bundle.version}, backend {name}, threshold "
                f"{report.threshold:.4f}; allowed: drift from the build machine <= "
                f"{report.max_drift_allowed}, |p - p_fp32| <= {report.max_abs_diff_allowed}, "
                f"decision margin {report.decision_margin}"
            )
            print(report.table())
            print(report.explain())
    if not reports:
        raise EngineNotInstalled(
            f"None of the engines model {bundle.name} {bundle.version} has a file for "
            f"({', '.join(skipped)}) is installed here, so nothing could be checked.",
            action="Reinstall the runtime with its dependencies (pip install '.' in its source "
            "folder; add '.[litert]' for LiteRT).",
        )
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    elif skipped:
        checked = ", ".join(r.backend for r in reports)
        print(f"checked: {checked}; skipped (not installed here): {', '.join(skipped)}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "process":
            return _cmd_process(args)
        if args.command == "config":
            if args.config_command == "reference":
                from .config_reference import reference_markdown

                print(reference_markdown(), end="")
                return 0
            return _cmd_config_check(args)
        if args.command == "schema":
            from .results import result_schema_text

            print(result_schema_text(), end="")
            return 0
        if args.command == "health":
            return _cmd_health(args)
        if args.command == "journal":
            return _cmd_journal(args)
        if args.command == "sample":
            return _cmd_sample(args)
        if args.command == "model" and args.model_command == "verify":
            return _cmd_model_verify(args)
        if args.command == "model":
            return _cmd_model_info(args)
    except ConfigError as exc:
        print(f"error: {exc.message}\n→ {exc.action}", file=sys.stderr)
        return 2
    except EdgeRuntimeError as exc:
        logging.getLogger("edge_runtime").debug("fatal", exc_info=True)
        print(f"error: {exc.message}\n→ {exc.action}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
