"""``pipeline`` command line (its commands: *Commands* in ``pipeline/README.md``)."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.settings import Settings, SettingsError

if TYPE_CHECKING:
    from pipeline.kafka.local import KafkaCluster

log = logging.getLogger("pipeline")
BROKER_HELP = "Kafka: host:port[,host:port...], kafka:// in front allowed (PIPELINE_BROKER)"


def _settings(args: argparse.Namespace) -> Settings:
    settings = Settings.from_env()
    overrides = {
        "broker": getattr(args, "broker", None),
        "port": getattr(args, "port", None),
        "ingest_processes": getattr(args, "ingest_processes", None),
    }
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = Path(args.data_dir)
    if getattr(args, "host", None):
        overrides["host"] = args.host
    return settings.with_overrides(**overrides)


def cmd_broker(args: argparse.Namespace) -> int:
    from pipeline.kafka.tansu import EmbeddedBroker, stop_signals_caught, wait_for_stop_signal

    with stop_signals_caught() as stop:
        broker = EmbeddedBroker(port=args.port, storage=args.storage).start()
        process = broker.process
        assert process is not None
        try:
            print(
                f"embedded broker (Tansu) on {broker.address}, storage {args.storage}; Ctrl-C stops it",
                flush=True,
            )
            if not wait_for_stop_signal(stop, lambda: process.poll() is None):
                print(f"the embedded broker exited on its own (code {process.returncode})", file=sys.stderr)
                return 1
        finally:
            broker.stop()
    return 0


def cmd_kafka(args: argparse.Namespace) -> int:
    from pipeline.kafka.local import KafkaCluster, KafkaError, fetch_jars
    from pipeline.kafka.tansu import stop_signals_caught, wait_for_stop_signal

    try:
        if args.fetch_only:
            print(fetch_jars(args.version, quiet=False))
            return 0
        if args.acls and not args.secure:
            print("pipeline kafka: --acls needs --secure", file=sys.stderr)
            return 2
        with stop_signals_caught() as stop:
            cluster = KafkaCluster(
                Path(args.dir),
                args.brokers,
                args.version,
                args.port,
                args.heap,
                security="secure" if args.secure else "plaintext",
                acls=args.acls,
            )
            cluster.start()
            try:
                print(
                    f"Apache Kafka {args.version}, {args.brokers} node(s), KRaft, data in {cluster.directory}"
                )
                if cluster.secure:
                    _print_secure_kafka(cluster)
                print(f"PIPELINE_BROKER={cluster.bootstrap}\nCtrl-C stops it", flush=True)
                if not wait_for_stop_signal(stop, lambda: all(node.running for node in cluster.nodes)):
                    gone = [node.node_id for node in cluster.nodes if not node.running]
                    print(
                        f"Kafka node(s) {gone} exited on their own, see {cluster.directory}", file=sys.stderr
                    )
                    return 1
            finally:
                cluster.stop()
    except KafkaError as exc:
        print(f"pipeline kafka: {exc}", file=sys.stderr)
        return 1
    return 0


def _print_secure_kafka(cluster: KafkaCluster) -> None:
    """What a worker needs for each way in, the grants it was given, where the rest is."""
    from pipeline.kafka.local import WORKER_GRANTS

    tls = cluster.tls_dir
    principals = ("User:worker", "User:CN=worker")
    if cluster.acls:
        for principal in principals:
            for resource_type, name, pattern_type, operations in WORKER_GRANTS:
                cluster.grant(principal, resource_type, name, pattern_type, operations)
        granted = "; ".join(f"{r} {p} {n!r}: {','.join(o)}" for r, n, p, o in WORKER_GRANTS)
        print(
            f"ACLs on (super users User:admin, User:ANONYMOUS); granted {' and '.join(principals)}: {granted}"
        )
    print(
        f"TLS files in {tls} (CA ca.pem), SASL users {', '.join(cluster.passwords)} (passwords in "
        f"{tls / 'users.json'}); internal PLAINTEXT listener, unauthenticated: {cluster.plaintext_bootstrap}"
    )
    print("# mutual TLS instead (principal User:CN=worker):")
    for name, value in (
        ("PIPELINE_BROKER", cluster.ssl_bootstrap),
        ("PIPELINE_KAFKA_SECURITY_PROTOCOL", "SSL"),
        ("PIPELINE_KAFKA_SSL_CAFILE", tls / "ca.pem"),
        ("PIPELINE_KAFKA_SSL_CERTFILE", tls / "client.pem"),
        ("PIPELINE_KAFKA_SSL_KEYFILE", tls / "client.key"),
    ):
        print(f"#   {name}={value}")
    print("# a worker over SASL_SSL, SCRAM-SHA-512 as user worker:")
    for name, value in (
        ("PIPELINE_KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
        ("PIPELINE_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
        ("PIPELINE_KAFKA_SASL_USERNAME", "worker"),
        ("PIPELINE_KAFKA_SASL_PASSWORD_FILE", tls / "worker.password"),
        ("PIPELINE_KAFKA_SSL_CAFILE", tls / "ca.pem"),
    ):
        print(f"{name}={value}")


def cmd_worker(args: argparse.Namespace) -> int:
    from pipeline.worker import run_worker

    settings = _settings(args)
    if not settings.broker:
        print("pipeline worker needs --broker or PIPELINE_BROKER (or use `pipeline run`)", file=sys.stderr)
        return 2
    if settings.data_dir == Path("./data"):
        settings = replace(settings, data_dir=Path(f"./data/worker-{settings.port}"))
    run_worker(settings, loglevel=args.loglevel)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.http.security import check_listeners, load_or_create_salt
    from pipeline.kafka.tansu import EmbeddedBroker
    from pipeline.worker import run_worker

    settings = _settings(args)
    if not settings.id_salt:  # one process: a salt of its own, kept with its data across restarts
        settings = replace(settings, id_salt=load_or_create_salt(settings.data_dir))
    check_listeners(settings)  # before the embedded broker starts
    broker = None
    if not settings.broker:
        broker = EmbeddedBroker(port=args.broker_port).start()
        print(f"started the embedded broker (Tansu) on {broker.address}", flush=True)
        settings = replace(
            settings,
            broker=broker.address,
            idempotent_producer=False,
            data_dir=settings.data_dir / f"embedded-{broker.port}",
        )
    demo = None
    if args.demo:
        import subprocess

        demo = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeline",
                "simulate",
                "--url",
                f"http://127.0.0.1:{settings.port}",
                "--wait-ready",
                "120",
                "--continuous",
            ],  # inherits the environment: simulate sends the ingest token it names, if any
        )
        admin = settings.admin_port or settings.port
        print(f"demo traffic running: see http://127.0.0.1:{admin}/campaigns and /metrics", flush=True)
    try:
        run_worker(settings, loglevel=args.loglevel)
    finally:
        if demo is not None:
            demo.terminate()
        if broker is not None:
            broker.stop()
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from pipeline.simulation.traffic import main as simulate_main

    return simulate_main(args)


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.diagnosis.report import main as report_main

    return report_main(args)


def cmd_bench(args: argparse.Namespace) -> int:
    import orjson

    from pipeline.bench.run import run
    from pipeline.bench.table import render

    result = run(
        {
            "small": args.small,
            "events": args.events,
            "baseline_events": args.baseline_events,
            "topology_runs": args.topology_runs,
            "campaigns": args.campaigns,
            "population": args.population,
            "subscribers": args.subscribers,
            "skip": args.skip.split(",") if args.skip else [],
            "profile": args.profile,
            "keep": args.keep,
            "workdir": args.workdir,
            "brokers": [kind.strip() for kind in args.brokers.split(",") if kind.strip()],
            "sustained_brokers": args.sustained_brokers.split(",") if args.sustained_brokers else None,
            "sustained_start": args.sustained_start,
        }
    )
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        print(render(result))
    if args.results:
        from pipeline.bench.table import write_results

        command = "pipeline " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "pipeline bench"
        for path in write_results(result, args.results, command):
            print(f"results written to {path}", file=sys.stderr)
    return 1 if result.get("errors") else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def worker_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--port", type=int, default=None, help="HTTP port (PIPELINE_PORT, default 8080)")
        p.add_argument("--host", default=None, help="HTTP bind address (PIPELINE_HOST, default 127.0.0.1)")
        p.add_argument("--data-dir", default=None, help="local state directory (PIPELINE_DATA_DIR)")
        p.add_argument(
            "--ingest-processes",
            type=int,
            default=None,
            help="ingest processes beside the stream worker, 0 = ingest in the worker's process "
            "(PIPELINE_INGEST_PROCESSES, default auto: 1 per 4 CPUs, at least 1; 0 on one CPU)",
        )
        p.add_argument("--loglevel", default="info")

    run = sub.add_parser("run", help="everything in one process; embedded broker when none is configured")
    worker_args(run)
    run.add_argument("--broker", default=None, help=BROKER_HELP)
    run.add_argument("--broker-port", type=int, default=None, help="port of the embedded broker")
    run.add_argument("--demo", action="store_true", help="also send continuous demo traffic")
    run.set_defaults(func=cmd_run)

    broker = sub.add_parser("broker", help="the embedded broker alone, in the foreground")
    broker.add_argument("--port", type=int, default=9092)
    broker.add_argument("--storage", default="memory://tansu/", help="memory://tansu/ or s3://bucket/")
    broker.set_defaults(func=cmd_broker)

    from pipeline.kafka.local import HEAP, KAFKA_VERSION, TESTED_VERSIONS

    kafka = sub.add_parser("kafka", help="Apache Kafka on loopback (KRaft, jars from Maven Central)")
    kafka.add_argument("--brokers", type=int, default=1, choices=(1, 3), help="one node, or a 3-node cluster")
    kafka.add_argument("--port", type=int, default=9092, help="client port of node 1; node n takes port+n-1")
    kafka.add_argument("--dir", default="./data/kafka", help="data folder (kept between runs)")
    tested = ", ".join(TESTED_VERSIONS)
    kafka.add_argument("--version", default=KAFKA_VERSION, help=f"Apache Kafka version (tested: {tested})")
    kafka.add_argument("--heap", default=HEAP, help="JVM heap of each node")
    kafka.add_argument(
        "--secure",
        action="store_true",
        help="clients only over SASL_SSL (port; PLAIN, SCRAM-SHA-256/512) and mutual TLS (port+200); "
        "certificates and users made in <dir>/tls/",
    )
    kafka.add_argument(
        "--acls",
        action="store_true",
        help="with --secure: deny what no ACL allows; grants the worker its own",
    )
    kafka.add_argument("--fetch-only", action="store_true", help="fetch the jars, print their folder, exit")
    kafka.set_defaults(func=cmd_kafka)

    worker = sub.add_parser("worker", help="one stream worker with its web endpoints")
    worker_args(worker)
    worker.add_argument("--broker", default=None, help=BROKER_HELP)
    worker.set_defaults(func=cmd_worker)

    bench = sub.add_parser(
        "bench", help="throughput, latency and memory side by side (embedded broker, Apache Kafka)"
    )
    bench.add_argument("--small", action="store_true", help="a small run (tests): seconds, not minutes")
    bench.add_argument("--json", action="store_true", help="the results as JSON on stdout")
    bench.add_argument("--events", type=int, default=None, help="events for ceiling and topology (200,000)")
    bench.add_argument("--baseline-events", type=int, default=None, help="events for natural Faust (5,000)")
    bench.add_argument(
        "--topology-runs",
        type=int,
        default=None,
        help="runs of the topology, the ceiling and each HTTP ingest row; the median reported (3)",
    )
    bench.add_argument("--campaigns", type=int, default=None, help="campaigns, Zipf-distributed (100)")
    bench.add_argument("--population", type=int, default=None, help="subscribers in the events (20,000)")
    bench.add_argument("--subscribers", type=int, default=None, help="dedupe state to measure (10,000,000)")
    bench.add_argument(
        "--skip",
        default="",
        help="comma-separated phases to skip: "
        "topology,direct,ceiling,baseline,ingest,latency,memory,scale,sustained",
    )
    bench.add_argument(
        "--sustained-brokers",
        default=None,
        help="broker kinds the sustained-capacity phase runs on, comma-separated (tansu,kafka); "
        "any kind --brokers takes",
    )
    bench.add_argument(
        "--sustained-start",
        type=float,
        default=None,
        help="events/s of the first sustained step (default 0.25x the topology rate)",
    )
    bench.add_argument("--profile", action="store_true", help="pyinstrument profile of the topology worker")
    bench.add_argument("--keep", action="store_true", help="keep the work directory (logs, profiles)")
    bench.add_argument("--workdir", default=None)
    bench.add_argument(
        "--brokers",
        default="tansu",
        help="brokers to run the broker-bound mechanisms on, one after the other: tansu (embedded), "
        "kafka (Apache Kafka, one node), kafka-<version>, kafka-sasl[-<version>] (the same node serving "
        "only SASL_SSL, every client and worker with SCRAM-SHA-512); e.g. tansu,kafka; kafka,kafka-sasl "
        "adds each row's ratio over SASL_SSL / plain TCP",
    )
    bench.add_argument(
        "--results",
        default=None,
        help="also write results.md (table, goals, machine) and results.json into this folder",
    )
    bench.set_defaults(func=cmd_bench)

    from pipeline.simulation.traffic import add_arguments

    simulate = sub.add_parser("simulate", help="realistic traffic with known ground truth")
    add_arguments(simulate)
    simulate.set_defaults(func=cmd_simulate)

    from pipeline.diagnosis.report import add_arguments as report_arguments

    report = sub.add_parser("report", help="the campaign funnel table with rates and diagnosis")
    report_arguments(report)
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
