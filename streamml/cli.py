"""The `streamml` command line: topics, producing data, and reading any StreamML topic."""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from typing import Annotated, Any

import click
import typer
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, KafkaError, KafkaException, Message, TopicPartition
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from streamml import sources
from streamml.codec import codec_for, decode_any, is_avro
from streamml.errors import StreamMLError, ValidationError
from streamml.kafka import check_broker, ensure_topics, make_admin, make_consumer, make_producer
from streamml.settings import Settings, get_settings
from streamml.topics import Catalogue, check_pipeline_name

app = typer.Typer(help="StreamML: event-streaming machine learning on Apache Kafka.", no_args_is_help=True)
topics_app = typer.Typer(help="Create and inspect the declared topics.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")
console = Console()
err_console = Console(stderr=True)
log = logging.getLogger(__name__)


def _settings() -> Settings:
    try:
        return get_settings()
    except Exception as exc:  # pydantic's ValidationError carries the variable and the reason
        raise StreamMLError(f"invalid StreamML settings: {exc}") from exc


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
    consumer = make_consumer(settings, f"streamml-tail-{uuid.uuid4().hex[:8]}")
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
