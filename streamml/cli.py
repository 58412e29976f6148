"""The `streamml` command line: topics, producing data, and reading any StreamML topic."""

from __future__ import annotations

import json
import logging
import shlex
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, KafkaError, KafkaException, Message, TopicPartition
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from streamml import control, pipelines, signing, sources
from streamml.codec import codec_for, decode_any, is_avro, registry_in_use, use_registry
from streamml.contracts import contracts_of, export
from streamml.errors import StreamMLError, ValidationError
from streamml.kafka import check_broker, ensure_topics, make_admin, make_consumer, make_producer
from streamml.registry import Registry, subject
from streamml.settings import Settings, get_settings
from streamml.topics import Catalogue, check_pipeline_name

app = typer.Typer(help="StreamML: event-streaming machine learning on Apache Kafka.", no_args_is_help=True)
topics_app = typer.Typer(help="Create and inspect the declared topics.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")
pipeline_app = typer.Typer(help="Apply, list, show and delete pipeline definitions.", no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")
model_app = typer.Typer(help="List model versions, promote and roll back.", no_args_is_help=True)
app.add_typer(model_app, name="model")
acl_app = typer.Typer(
    help="Principals and ACLs of a secured cluster, from the catalogue.", no_args_is_help=True
)
app.add_typer(acl_app, name="acl")
keys_app = typer.Typer(help="Ed25519 keys that sign and verify model versions.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
schema_app = typer.Typer(help="Typed per-pipeline Avro contracts (generated).", no_args_is_help=True)
app.add_typer(schema_app, name="schema")
# Piped output (scripts, tests, CI logs) gets wide tables instead of truncated cells.
console = Console(width=None if sys.stdout.isatty() else 240)
err_console = Console(stderr=True)
log = logging.getLogger(__name__)


def _settings() -> Settings:
    try:
        settings = get_settings()
    except Exception as exc:  # pydantic's ValidationError carries the variable and the reason
        raise StreamMLError(f"invalid StreamML settings: {exc}") from exc
    if settings.schema_registry_url and registry_in_use() is None:
        use_registry(Registry(settings))  # records the services wrote framed (no registry call until read)
    return settings


def _pipelines(names: list[str] | None) -> list[str]:
    try:
        return [check_pipeline_name(n) for n in names or []]
    except ValueError as exc:
        raise ValidationError(str(exc)) from exc


@topics_app.command("create")
def topics_create(
    pipeline: Annotated[
        list[str] | None, typer.Option("--pipeline", "-p", help="Also create this pipeline's data topics.")
    ] = None,
) -> None:
    """Create the global topics (and each named pipeline's) idempotently, verifying existing ones."""
    settings = _settings()
    check_broker(settings)
    catalogue = Catalogue(settings)
    specs = catalogue.global_topics()
    for name in _pipelines(pipeline):
        specs += catalogue.pipeline_topics(name)
    statuses = ensure_topics(settings, specs)
    table = Table("topic", "partitions", "policy", "status")
    for st in statuses:
        table.add_row(
            st.spec.name, str(st.spec.partitions), st.spec.cleanup_policy, "created" if st.created else "ok"
        )
    console.print(table)


@topics_app.command("list")
def topics_list(
    pipeline: Annotated[
        list[str] | None, typer.Option("--pipeline", "-p", help="Include this pipeline.")
    ] = None,
) -> None:
    """List declared topics, their contract and whether they exist on the broker."""
    settings = _settings()
    check_broker(settings)
    catalogue = Catalogue(settings)
    existing = make_admin(settings).list_topics(timeout=10).topics
    names = set(_pipelines(pipeline))
    names |= {t.split(".")[1] for t in existing if catalogue.resolve(t) and t.count(".") == 2}
    specs = catalogue.global_topics() + [s for p in sorted(names) for s in catalogue.pipeline_topics(p)]
    table = Table("topic", "schema", "encoding", "key", "partitions", "policy", "exists")
    for spec in specs:
        there = existing.get(spec.name)
        table.add_row(
            spec.name,
            spec.schema,
            spec.encoding,
            spec.key,
            str(len(there.partitions)) if there else str(spec.partitions),
            spec.cleanup_policy,
            "yes" if there else "no",
        )
    console.print(table)


def _raw_payload(value: dict[str, Any], fmt: str) -> bytes:
    if fmt == "json":
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
    return codec_for("RawEvent").encode({"fields": value, "event_time": None})


@app.command()
def produce(
    source: Annotated[str, typer.Argument(help=sources.describe_sources())],
    topic: Annotated[str | None, typer.Option(help="Topic to produce to.")] = None,
    pipeline: Annotated[str | None, typer.Option(help="Produce to this pipeline's raw topic.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Stop after this many events.")] = None,
    rate: Annotated[
        float | None, typer.Option(min=0.001, help="Events per second (default: as fast as possible).")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="json (a flat object) or avro (RawEvent).")] = "json",
    key_field: Annotated[str | None, typer.Option(help="Use this field's value as the record key.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of generated sources.")] = 42,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Produce raw events from a file, a River dataset or a generator, at an optional steady rate."""
    if (topic is None) == (pipeline is None):
        raise ValidationError("give exactly one of --topic or --pipeline")
    if fmt not in ("json", "avro"):
        raise ValidationError(f"--format must be json or avro, got {fmt!r}")
    settings = _settings()
    target = topic or Catalogue(settings).raw(_pipelines([pipeline or ""])[0]).name
    events = sources.open_source(source, limit=limit, seed=seed)  # a bad source fails before any I/O
    check_broker(settings)
    producer = make_producer(settings)
    failures: list[str] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            failures.append(str(err))

    sent = 0
    start = time.monotonic()
    columns = (
        TextColumn("producing to {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err_console, disable=not progress) as bar:
        task = bar.add_task(target, total=limit)
        try:
            for event in events:
                if rate:
                    delay = start + sent / rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                key = event.value.get(key_field) if key_field else None
                payload = _raw_payload(event.value, fmt)
                while True:
                    try:
                        producer.produce(
                            target,
                            payload,
                            key=None if key is None else str(key).encode(),
                            on_delivery=on_delivery,
                        )
                        break
                    except BufferError:  # local queue full: let deliveries drain, then retry
                        producer.poll(0.1)
                producer.poll(0)
                sent += 1
                bar.advance(task)
        except ValidationError as exc:
            producer.flush(30)
            raise ValidationError(f"{exc} ({sent} events before it were produced to {target})") from exc
        finally:
            remaining = producer.flush(30)
    if failures or remaining:
        raise StreamMLError(
            f"{len(failures) + remaining} of {sent} events were not delivered: {failures[:3]}"
        )
    elapsed = time.monotonic() - start
    err_console.print(
        f"produced {sent} events to {target} in {elapsed:.1f} s ({sent / max(elapsed, 1e-9):.0f}/s)"
    )


def decode_value(value: bytes | None) -> tuple[str, Any]:
    """Best-effort decoding for display: (kind, value)."""
    if value is None:
        return "tombstone", None
    if is_avro(value):
        try:
            return decode_any(value)
        except StreamMLError as exc:
            return "undecodable", f"{exc}: {value[:64].hex()}"
    try:
        return "json", json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "bytes", value[:256].hex()


def _printable(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return {"bytes": len(obj), "head": obj[:32].hex()}
    if isinstance(obj, dict):
        return {k: _printable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_printable(v) for v in obj]
    return obj


@app.command()
def tail(
    topic: Annotated[str, typer.Argument(help="Any StreamML topic (or any topic holding JSON).")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep waiting for new records.")] = False,
    from_beginning: Annotated[
        bool, typer.Option(help="Start at the oldest record (else only new ones).")
    ] = True,
    limit: Annotated[int | None, typer.Option(min=1, help="Stop after this many records.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line (for scripts).")] = False,
) -> None:
    """Decode and print the records of a topic; without --follow, stop at the current end."""
    settings = _settings()
    check_broker(settings)
    spec = Catalogue(settings).resolve(topic)
    consumer = make_consumer(settings, f"{settings.topic_prefix}-cli-tail-{uuid.uuid4().hex[:8]}")
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise StreamMLError(f"topic {topic} does not exist (see `streamml topics list`)")
        start = OFFSET_BEGINNING if from_beginning else OFFSET_END
        parts = [TopicPartition(topic, p, start) for p in sorted(meta.partitions)]
        ends = {p.partition: consumer.get_watermark_offsets(p, timeout=10)[1] for p in parts}
        consumer.assign(parts)
        if not as_json and spec:
            err_console.print(
                f"[dim]{topic}: {spec.schema} records ({spec.encoding}), key = {spec.key}[/dim]"
            )
        seen = 0
        done = {p for p, end in ends.items() if end == 0 or not from_beginning}
        while limit is None or seen < limit:
            if not follow and len(done) == len(ends):
                break
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                raise StreamMLError(f"consuming {topic} failed: {msg.error()}")
            kind, value = decode_value(msg.value())
            raw_key = msg.key()
            key = raw_key.decode(errors="replace") if isinstance(raw_key, bytes) else raw_key
            out = {"partition": msg.partition(), "offset": msg.offset(), "key": key, "type": kind}
            out["value"] = _printable(value)
            if as_json:
                sys.stdout.write(json.dumps(out, default=str) + "\n")
            else:
                console.print_json(data=out, default=str)
            seen += 1
            partition, offset = msg.partition() or 0, msg.offset() or 0
            if offset + 1 >= ends.get(partition, 0):
                done.add(partition)
    except KafkaException as exc:
        raise StreamMLError(f"consuming {topic} failed: {exc}") from exc
    finally:
        consumer.close()


def _key_option(key: bytes) -> str:
    """How to give a record key on the command line: --key TEXT, or --key-hex for keys that are not text."""
    text = control.key_text(key)
    return f"--key {shlex.quote(text)}" if text is not None else f"--key-hex {key.hex()}"


def _warn(skipped: control.SkippedRecord, hint: str) -> None:
    if skipped.key is None:
        key = "no key"
    else:
        text = control.key_text(skipped.key)
        key = f"key {text!r}" if text is not None else f"key hex {skipped.key.hex()}"
    err_console.print(
        f"warning: skipped {skipped.where} ({key}): {skipped.reason} — {hint}",
        style="yellow", markup=False, highlight=False, soft_wrap=True,
    )  # fmt: skip


def _warn_pipelines(state: control.PipelineState) -> None:
    """One line per bad record on the pipelines topic, with the command that repairs it."""
    holders = {key: name for name, key in state.keys.items() if not state.current[name]["deleted"]}
    for s in state.skipped:
        if s.key is None:
            hint = "ignored (a record without a key cannot be removed by a tombstone)"
        elif s.key in holders:
            hint = (
                f"ignored; re-applying pipeline {holders[s.key]} (`streamml pipeline apply FILE`) replaces it"
            )
        else:
            hint = f"ignored; `streamml pipeline delete {_key_option(s.key)}` removes it"
        _warn(s, hint)


def _warn_models(history: control.ModelHistory) -> None:
    for s in history.skipped:
        _warn(s, "ignored here and by the services")


@pipeline_app.command("apply")
def pipeline_apply(file: Annotated[Path, typer.Argument(help="Pipeline definition (YAML or JSON).")]) -> None:
    """Validate a pipeline file, create its topics and publish it (a new revision if it exists)."""
    spec = pipelines.load_file(file)
    settings = _settings()
    check_broker(settings)
    catalogue = Catalogue(settings)
    ensure_topics(settings, catalogue.global_topics() + catalogue.pipeline_topics(spec.name))
    state = control.read_pipelines(settings)
    _warn_pipelines(state)
    existing = state.current.get(spec.name)
    revision = existing["revision"] + 1 if existing else 1
    definition = pipelines.to_definition(spec, catalogue.raw(spec.name).name, revision)
    if definition.raw_topic != catalogue.raw(spec.name).name:
        ensure_topics(settings, [replace(catalogue.raw(spec.name), name=definition.raw_topic)])
    registry = Registry.from_settings(settings)
    if registry is not None:
        _register_contracts(registry, catalogue, definition.to_avro())
    control.publish(
        settings, catalogue.pipelines().name, "PipelineDefinition", spec.name, definition.to_avro()
    )
    console.print(
        f"pipeline [bold]{spec.name}[/bold] revision {revision} applied (raw topic {definition.raw_topic})"
    )


def _register_contracts(registry: Registry, catalogue: Catalogue, definition: dict[str, Any]) -> None:
    """Check the revision's typed contracts against the registry, then register them; an incompatible
    one refuses the revision (nothing registered, nothing published) with the registry's reason."""
    generated = contracts_of(definition)
    subjects = {
        definition["raw_topic"]: generated.raw,
        catalogue.features(definition["name"]).name: generated.features,
    }
    refused = registry.incompatible(subjects)
    if refused:
        lines = "\n".join(f"  {r.subject}: {r.reason}" for r in refused)
        raise StreamMLError(
            f"pipeline {definition['name']} revision {definition['revision']} refused: the schema registry "
            f"finds its schemas incompatible with the versions registered (BACKWARD):\n{lines}"
        )
    ids = {topic: registry.register(topic, contract) for topic, contract in subjects.items()}
    console.print(
        "registered " + ", ".join(f"{subject(t)} (id {i})" for t, i in ids.items()) + f" at {registry.url}"
    )


@pipeline_app.command("list")
def pipeline_list() -> None:
    """The current pipelines (bad records on the pipelines topic are reported and skipped)."""
    settings = _settings()
    check_broker(settings)
    state = control.read_pipelines(settings)
    _warn_pipelines(state)
    table = Table("pipeline", "revision", "task", "raw topic", "online model", "promotion", "status")
    for name, rec in sorted(state.current.items()):
        online = next((m["estimator_spec"] for m in rec["models"] if m["kind"] == "ONLINE"), "-")
        status = "deleted" if rec["deleted"] else "active"
        table.add_row(
            name, str(rec["revision"]), rec["task"], rec["raw_topic"], online, rec["promotion_mode"], status
        )
    console.print(table)


def _bad_records_of(state: control.PipelineState, name: str) -> list[control.SkippedRecord]:
    """Bad records that claim a pipeline name, or are keyed by it (as `pipeline apply` keys records)."""
    return [s for s in state.skipped if s.name == name or s.key == name.encode()]


@pipeline_app.command("show")
def pipeline_show(name: str) -> None:
    """The full current definition of a pipeline."""
    settings = _settings()
    check_broker(settings)
    state = control.read_pipelines(settings)
    _warn_pipelines(state)
    rec = state.current.get(name)
    if rec is None:
        if _bad_records_of(state, name):
            raise ValidationError(f"pipeline {name!r} has no valid record (see the warnings above)")
        raise ValidationError(f"no pipeline named {name!r} (see `streamml pipeline list`)")
    console.print_json(data=rec)


@schema_app.command("export")
def schema_export(
    pipeline: Annotated[
        str, typer.Argument(help="A pipeline file (YAML or JSON), or an applied pipeline's name.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder to write the .avsc files to.")] = Path("."),
) -> None:
    """Write a pipeline's generated Avro schemas (raw event, feature vector) as .avsc files."""
    settings = _settings()
    catalogue = Catalogue(settings)
    path = Path(pipeline)
    if path.is_file():
        spec = pipelines.load_file(path)
        definition = pipelines.to_definition(spec, catalogue.raw(spec.name).name).to_avro()
    else:
        check_broker(settings)
        state = control.read_pipelines(settings)
        _warn_pipelines(state)
        found = state.current.get(pipeline)
        if found is None or found["deleted"]:
            raise ValidationError(f"no file and no applied pipeline named {pipeline!r}")
        definition = found
    for written in export(definition, out):
        console.print(f"wrote {written}")


def _remove_key(settings: Settings, state: control.PipelineState, topic: str, key: bytes) -> None:
    """Tombstone a key, unless it holds an active pipeline (services ignore tombstones: it would run on)."""
    shown = _key_option(key)
    holder = next((name for name, k in state.keys.items() if k == key), None)
    if holder is not None and not state.current[holder]["deleted"]:
        raise ValidationError(
            f"{shown} holds the active pipeline {holder}: `streamml pipeline delete {holder}` stops it "
            "(a tombstone would not: services ignore tombstones)"
        )
    bad = [s for s in state.skipped if s.key == key]
    if holder is None and not bad:
        raise ValidationError(f"no record with {shown} on {topic} (see `streamml pipeline list`)")
    control.tombstone(settings, topic, key)
    what = ", ".join([s.where for s in bad] + ([f"deleted pipeline {holder}"] if holder else []))
    console.print(f"removed {what} ({shown}): a tombstone; compaction drops the old records", soft_wrap=True)


@pipeline_app.command("delete")
def pipeline_delete(
    name: Annotated[
        str | None, typer.Argument(help="The pipeline (also an invalid name a bad record has).")
    ] = None,
    key: Annotated[
        str | None, typer.Option("--key", help="Remove the records with this key (as the warnings name it).")
    ] = None,
    key_hex: Annotated[
        str | None, typer.Option("--key-hex", help="The same, with the key in hex (keys that are not text).")
    ] = None,
) -> None:
    """Mark a pipeline deleted (services stop it; its topics and data stay), or remove bad records by key."""
    if sum(x is not None for x in (name, key, key_hex)) != 1:
        raise ValidationError("give exactly one of NAME, --key or --key-hex")
    settings = _settings()
    check_broker(settings)
    topic = Catalogue(settings).pipelines().name
    state = control.read_pipelines(settings)
    _warn_pipelines(state)
    if name is None:
        try:
            raw = key.encode() if key is not None else bytes.fromhex(key_hex or "")
        except ValueError as exc:
            raise ValidationError(f"--key-hex {key_hex!r} is not hexadecimal") from exc
        _remove_key(settings, state, topic, raw)
        return
    rec = state.current.get(name)
    if rec is not None and not rec["deleted"]:
        rec = {**rec, "deleted": True, "revision": rec["revision"] + 1, "updated_at": int(time.time() * 1000)}
        control.publish(settings, topic, "PipelineDefinition", name, rec)
        console.print(f"pipeline {name} deleted (revision {rec['revision']})")
        return
    bad_keys = {s.key for s in _bad_records_of(state, name) if s.key is not None}
    if not bad_keys:
        raise ValidationError(f"no active pipeline named {name!r}")
    for raw in sorted(bad_keys):
        _remove_key(settings, state, topic, raw)


@model_app.command("list")
def model_list(pipeline: str) -> None:
    """Versions with metrics and lineage, which one is live, and why each decision was made."""
    settings = _settings()
    check_broker(settings)
    history = control.model_history(settings, pipeline)
    _warn_models(history)
    for d in history.ignored():
        err_console.print(
            f"warning: {d['action']} of {d['model_name']} v{d['version']} by {d['actor']} names a version "
            "that does not exist: not live",
            style="yellow", markup=False, highlight=False, soft_wrap=True,
        )  # fmt: skip
    live = history.live()
    table = Table("model", "version", "kind", "events", "metrics", "parent", "created", "status")
    reasons: dict[tuple[str, int], str] = {}
    for d in history.decisions:
        reasons[(d["model_name"], d["version"])] = f"{d['action'].lower()} by {d['actor']}: {d['reason']}"
    for v in history.versions or []:
        key = (v["model_name"], v["version"])
        is_live = live is not None and (live["model_name"], live["version"]) == key
        shown = ", ".join(f"{k}={x:.4g}" for k, x in sorted(v["metrics"].items()) if k != "events_seen")
        status = ("[green]LIVE[/green] " if is_live else "") + reasons.get(key, "")
        created = time.strftime("%H:%M:%S", time.localtime(v["created_at"] / 1000))
        table.add_row(v["model_name"], str(v["version"]), v["kind"], str(v["events_seen"]), shown,
                      str(v["parent_version"] or "-"), created, status)  # fmt: skip
    console.print(table)
    if live is None:
        console.print("no version is live yet")


@model_app.command("promote")
def model_promote(
    pipeline: str,
    version: int,
    model: Annotated[str | None, typer.Option(help="Model name, if the pipeline has several.")] = None,
    reason: Annotated[str, typer.Option(help="Why (recorded with the decision).")] = "manual promotion",
) -> None:
    """Make a version live (a PROMOTE record on the promotions topic); only versions that exist."""
    settings = _settings()
    check_broker(settings)
    history = control.model_history(settings, pipeline)
    _warn_models(history)
    try:
        target = control.find_version(history, version, model)
    except ValidationError as exc:
        raise ValidationError(f"{pipeline}: {exc}; nothing was promoted") from exc
    live = history.live()
    control.decide(settings, pipeline, target["model_name"], version, "PROMOTE", reason,
                   live["version"] if live else None, target["metrics"])  # fmt: skip
    console.print(f"{pipeline}: {target['model_name']} v{version} promoted")


@model_app.command("rollback")
def model_rollback(
    pipeline: str, reason: Annotated[str, typer.Option(help="Why.")] = "manual rollback"
) -> None:
    """Make the previously live version live again."""
    settings = _settings()
    check_broker(settings)
    history = control.model_history(settings, pipeline)
    _warn_models(history)
    live, previous = history.live(), history.previous_live()
    if live is None or previous is None:
        raise ValidationError(f"{pipeline}: no earlier live version to roll back to; nothing was changed")
    control.decide(settings, pipeline, previous["model_name"], previous["version"], "ROLLBACK", reason,
                   live["version"])  # fmt: skip
    console.print(f"{pipeline}: rolled back from v{live['version']} to v{previous['version']}")


@app.command()
def top(
    state: Annotated[
        Path | None, typer.Option(help="State file of the running stack (default: .local/stack.json).")
    ] = None,
    duration: Annotated[
        float | None, typer.Option(min=0.1, help="Exit after this many seconds (default: until Ctrl-C).")
    ] = None,
    svg: Annotated[Path | None, typer.Option(help="Also save the last view as an SVG picture.")] = None,
) -> None:
    """Live view of a running stack: events/s per stage, dead letters, live model, swaps, accuracy."""
    from streamml import dashboard  # imported here so other commands do not pay for rich.live

    dashboard.run(state or dashboard.DEFAULT_STATE, duration=duration, console=console, svg=svg)


@app.command()
def status(
    state: Annotated[
        Path | None, typer.Option(help="State file of the running stack (default: .local/stack.json).")
    ] = None,
    recent: Annotated[int, typer.Option(min=1, help="How many promotions and drift alerts to list.")] = 5,
    sample: Annotated[
        float, typer.Option(min=0.1, help="Seconds between the two metrics scrapes rates come from.")
    ] = 1.0,
) -> None:
    """The whole system at once: pipelines, live versions, rates, lag, recent promotions and drift alerts."""
    from streamml import dashboard
    from streamml import status as status_view  # imported here: other commands need not load it

    settings = _settings()
    check_broker(settings)
    view = status_view.collect(settings, state or dashboard.DEFAULT_STATE, recent=recent, sample_s=sample)
    now_ms = int(time.time() * 1000)
    console.print(status_view.render(view, now_ms=now_ms, title=status_view.title(settings)))


@acl_app.command("apply")
def acl_apply(
    pipeline: Annotated[
        list[Path] | None,
        typer.Option(
            "--pipeline", "-p", help="Also cover this pipeline file's topics (before it is applied)."
        ),
    ] = None,
    secrets_dir: Annotated[
        Path | None,
        typer.Option(help="Folder of <user>.password files (missing ones are generated, mode 0600)."),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the changes; change nothing.")] = False,
) -> None:
    """Create the SCRAM users and ACLs of every service and the CLI (idempotent; run as the operator).

    Covers the global topics, every pipeline on the pipelines topic and each --pipeline file; ACLs of
    StreamML's users that the catalogue no longer declares are removed.
    """
    from streamml import acl
    from streamml.localkafka import default_home

    settings = _settings()
    check_broker(settings)
    catalogue = Catalogue(settings)
    covered: dict[str, str | None] = {}
    admin = make_admin(settings)
    if catalogue.pipelines().name in admin.list_topics(timeout=30).topics:  # none before `topics create`
        for name, rec in control.read_pipelines(settings).current.items():
            if not rec["deleted"]:
                covered[name] = rec["raw_topic"]
    for file in pipeline or []:
        spec = pipelines.load_file(file)
        covered[spec.name] = spec.raw_topic or catalogue.raw(spec.name).name
    wanted = acl.plan(catalogue, covered.items())
    folder = secrets_dir or default_home() / "users"
    changes = acl.apply(admin, wanted, folder, dry_run=dry_run)
    verb = "would " if dry_run else ""
    for user in changes.users_created:
        console.print(f"{verb}set SCRAM credential: {user} (password in {acl.password_file(folder, user)})")
    for grant in changes.added:
        console.print(f"{verb}add    {grant.line()}", highlight=False)
    for grant in changes.removed:
        console.print(f"{verb}remove {grant.line()}", highlight=False)
    names = ", ".join(sorted(covered)) or "-"
    summary = f"{len(wanted)} ACLs for {len(acl.PRINCIPALS)} principals, pipelines: {names}"
    console.print(("no changes; " if changes.empty else "") + summary, highlight=False)


@app.command()
def doctor(
    state: Annotated[Path, typer.Option(help="The local stack's state file.")] = Path(".local/stack.json"),
) -> None:
    """Check a deployment from your seat: broker, topics, principals and ACLs, signing keys, services."""
    from streamml import doctor as checks

    marks = {"ok": "[green]ok[/green]", "warn": "[yellow]warn[/yellow]", "fail": "[red]FAIL[/red]",
             "skip": "[dim]skip[/dim]"}  # fmt: skip

    def report(check: checks.Check) -> None:
        console.print(f"{marks[check.status]:>20}  {check.area}: {check.detail}", highlight=False)
        if check.fix:
            console.print(f"{'':>6}fix: {check.fix}", highlight=False)

    if not checks.run(_settings(), state, report):
        raise typer.Exit(1)


@keys_app.command("generate")
def keys_generate(
    out: Annotated[Path, typer.Argument(help="File for the private key (PEM, created with mode 0600).")],
    comment: Annotated[str, typer.Option(help="Comment after the public key (e.g. who signs with it).")] = "",
) -> None:
    """A new Ed25519 key pair: the private key to OUT (for learner and trainer:
    STREAMML_MODEL_SIGNING_KEY_FILE), the public key printed (for every service: STREAMML_MODEL_VERIFY_KEYS
    or a line of STREAMML_MODEL_VERIFY_KEYS_FILE). The private key is never printed."""
    if out.exists():
        raise StreamMLError(f"{out} exists: refusing to overwrite a key (remove it first)")
    key = signing.generate()
    signing.write_private_key(out, key)
    console.print(signing.public_line(key.public_key(), comment), soft_wrap=True)
    err_console.print(f"private key written to {out} (key id {signing.key_id(key.public_key())})")


@keys_app.command("show")
def keys_show(
    key: Annotated[Path, typer.Argument(help="Private key file (PEM).")],
) -> None:
    """The public key line and key id of a private key file."""
    private = signing.load_private_key(key)
    console.print(signing.public_line(private.public_key()), soft_wrap=True)
    err_console.print(f"key id {signing.key_id(private.public_key())}")


def main() -> None:
    """Entry point: user errors print one clear line and exit 2, never a traceback."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app(standalone_mode=False)
    except StreamMLError as exc:
        err_console.print(f"[bold red]error:[/bold red] {exc}")
        sys.exit(2)
    except click.ClickException as exc:  # usage errors: click's own message and exit code
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        sys.exit(130)


if __name__ == "__main__":
    main()
