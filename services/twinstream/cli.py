"""``twinstream``: the command users reach for first.

  twinstream demo                      start the stack, stream FEBRL, print a report
  twinstream stack up                  run the local stack on the default ports until Ctrl-C
  twinstream status                    rates, lag, decisions, dead letters, health (from Prometheus)
  twinstream decisions --tenant T      read the decisions back (--follow, --kind, --json)
  twinstream ingest FILE...            send JSONL/text/image files to ingestion
  twinstream match ...                 top-k similar items for an item id, text or file
  twinstream train|evaluate|temperature-study ...   the learning side (see docs/learn.md)
  twinstream base-bundle --out DIR     build the untrained MiniLM bundle
  twinstream adapt --tenant T --collection C   fine-tune a new model version on that collection's
                                       own items, no labels (docs/learn.md)
  twinstream reembed --bundle DIR      fill a new model version's collection from items.accepted
  twinstream promote --model M --version V   switch the live alias to that version
  twinstream dlq redrive --reason R    re-publish dead letters' bytes to their source topic
                                       (--tenant T, --dry-run; docs/failures.md)
  twinstream token issue --tenant T --scopes ingest,match --ttl 1h   print a bearer token

ingest/match/status speak TLS and send a token (docs/security.md): --ca-file (or
TWINSTREAM_TLS_CA_FILE; default the local stack's CA), --token (or TWINSTREAM_TOKEN);
--plaintext only against a server started with TWINSTREAM_GRPC_PLAINTEXT.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from twinstream.common.security import SCOPES, ClientCredentials
from twinstream.v1 import decisions_pb2, items_pb2, matching_pb2

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp"}
# `twinstream stack up` writes its CA and token key here (devcerts.py).
DEV_SECURITY = Path(__file__).resolve().parents[2] / "var" / "stack" / "security"
TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _credentials(args: argparse.Namespace) -> ClientCredentials:
    """TLS with the given CA (the local stack's when it exists, else the system's roots) and
    the token, unless --plaintext."""
    token = args.token or os.environ.get("TWINSTREAM_TOKEN", "")
    if args.plaintext:
        return ClientCredentials.plaintext(token)
    ca_file = args.ca_file or os.environ.get("TWINSTREAM_TLS_CA_FILE", "")
    if not ca_file and (DEV_SECURITY / "ca.pem").exists():
        ca_file = str(DEV_SECURITY / "ca.pem")
    return ClientCredentials(ca_file=ca_file, token=token)


def _ttl_seconds(text: str) -> int:
    unit = text[-1:].lower()
    number = text[:-1] if unit in TTL_UNITS else text
    if not number.isdigit() or int(number) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a lifetime like 90s, 15m, 1h or 7d")
    return int(number) * TTL_UNITS.get(unit, 1)


def cmd_token(args: argparse.Namespace) -> int:
    """Print a signed token; the key is the servers' TWINSTREAM_AUTH_TOKEN_KEY_FILE."""
    from twinstream.common.security import issue_token, read_key

    key_file = args.key_file or os.environ.get("TWINSTREAM_AUTH_TOKEN_KEY_FILE", "") \
        or str(DEV_SECURITY / "token.key")
    tenants = [t.strip() for t in ",".join(args.tenant).split(",") if t.strip()]
    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
    try:
        token = issue_token(read_key(key_file), args.subject, tenants, scopes, args.ttl)
    except (ValueError, OSError) as exc:
        print(f"twinstream token: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


def _items_from_files(paths: list[Path], tenant: str, collection: str) -> Iterator[items_pb2.Item]:
    """JSONL files give one item per line ({"id", "text"|"record", "metadata"}); image files
    give one image item each; other files give one text item each."""
    for path in paths:
        if path.suffix.lower() in IMAGE_SUFFIXES:
            yield items_pb2.Item(item_id=path.stem, tenant=tenant, collection=collection,
                                 modality=items_pb2.IMAGE, content=path.read_bytes())
        elif path.suffix.lower() == ".jsonl":
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                record = row.get("record")
                yield items_pb2.Item(
                    item_id=str(row.get("id", f"{path.stem}-{number}")), tenant=tenant,
                    collection=collection,
                    modality=items_pb2.RECORD if record is not None else items_pb2.TEXT,
                    content=(json.dumps(record) if record is not None else str(row["text"])).encode(),
                    metadata={str(k): str(v) for k, v in row.get("metadata", {}).items()},
                )
        else:
            yield items_pb2.Item(item_id=path.stem, tenant=tenant, collection=collection,
                                 modality=items_pb2.TEXT, content=path.read_bytes())


def cmd_ingest(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from twinstream.client import TwinstreamClient

    with TwinstreamClient(args.ingestion, args.matching, credentials=_credentials(args)) as client:
        items = tqdm(_items_from_files(args.files, args.tenant, args.collection), unit="item",
                     desc="ingest")
        summary = client.ingest_many(items, assign_id=args.assign_ids)
    print(f"accepted {summary.accepted}, rejected {summary.rejected}")
    for rejection in summary.rejections:
        print(f"  #{rejection.index} {rejection.item_id or '-'}: {rejection.reason}: "
              f"{rejection.detail}")
    return 0 if summary.rejected == 0 else 2


def cmd_match(args: argparse.Namespace) -> int:
    from twinstream.client import TwinstreamClient

    filters = []
    for condition in args.where or []:
        key, _, value = condition.partition("=")
        filters.append(matching_pb2.MetadataCondition(key=key, op=matching_pb2.MetadataCondition.EQ,
                                                       values=[value]))
    with TwinstreamClient(args.ingestion, args.matching, credentials=_credentials(args)) as client:
        if args.file:
            suffix = args.file.suffix.lower()
            modality = items_pb2.IMAGE if suffix in IMAGE_SUFFIXES else items_pb2.TEXT
            response = client.match(args.tenant, content=args.file.read_bytes(), modality=modality,
                                    collection=args.collection, k=args.k, min_score=args.min_score,
                                    filters=filters)
        else:
            response = client.match(args.tenant, item_id=args.id or "", text=args.text,
                                    collection=args.collection, k=args.k,
                                    min_score=args.min_score, filters=filters)
    print(f"model {response.model.name}:{response.model.version}  "
          f"(duplicate >= {response.thresholds.duplicate:.3f}, match >= "
          f"{response.thresholds.match:.3f})")
    for result in response.results:
        print(f"  {result.item_id:<30} score {result.score:.4f}  P(dup) "
              f"{result.duplicate_probability:.3f}  cluster {result.cluster_id}")
    return 0


def cmd_stack(args: argparse.Namespace) -> int:
    from twinstream.demo import DEFAULT_BUNDLE
    from twinstream.devstack import LocalStack, StackConfig, prepare_bundles

    prepare_bundles(args.bundle, DEFAULT_BUNDLE)
    stack = LocalStack(StackConfig(bundles=args.bundle, fixed_ports=True,
                                   broker_storage=args.broker_storage, milvus=args.milvus))
    stack.start()
    print(f"stack up: ingestion {stack.grpc_target('ingestion')}, matching "
          f"{stack.grpc_target('matching')}, Kafka {stack.kafka_bootstrap}, Milvus "
          f"{stack.milvus_uri}, Triton {stack.triton_url}, Prometheus {stack.prometheus_url}")
    if stack.dashboard_url:
        print(f"dashboard: {stack.dashboard_url}   alerts: {stack.alertmanager_url}")
    if stack.security is not None:
        print(f"TLS CA: {stack.security.ca_file} (the CLI finds it); a token: "
              "twinstream token issue --tenant T --scopes ingest,match --ttl 1h")
    print("crashed pieces are restarted (a supervisor, as the kubelet is in a cluster)", flush=True)
    stopping = threading.Event()
    try:
        stack.supervise(stopping)
    except KeyboardInterrupt:
        pass
    finally:
        stopping.set()
        stack.stop()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Exit 0 when every stage is SERVING and scraped, 1 otherwise."""
    from twinstream.status import DEFAULT_HEALTH_TARGETS, PrometheusUnavailable, collect, render

    targets = {**DEFAULT_HEALTH_TARGETS, "ingestion": args.ingestion, "matching": args.matching}
    for override in args.health or []:
        stage, _, target = override.partition("=")
        targets[stage] = target
    try:
        status = collect(args.prometheus, targets, _credentials(args))
    except PrometheusUnavailable as exc:
        print(f"{exc}\nstart the stack (`twinstream stack up`) or pass --prometheus URL")
        return 1
    print(render(status), end="")
    healthy = all(h == "SERVING" for h in status.health.values()) and all(status.up.values())
    return 0 if healthy else 1


def describe(decision: decisions_pb2.Decision) -> str:
    """One line per decision: what it is, what it duplicates, its cluster and its neighbours."""
    kind = decisions_pb2.DecisionKind.Name(decision.kind)
    line = (f"{decision.collection}/{decision.item_id}  {kind}  score {decision.score:.4f}  "
            f"P(dup) {decision.duplicate_probability:.3f}  of {decision.duplicate_of or '-'}  "
            f"cluster {decision.cluster_id}")
    if decision.merged_clusters:
        line += f" (merged {', '.join(decision.merged_clusters)})"
    neighbours = ", ".join(f"{n.item_id} {n.score:.3f}" for n in decision.neighbours)
    return f"{line}  neighbours [{neighbours}]"


def read_decisions(bootstrap: str, tenant: str, collection: str, kinds: Sequence[str],
                   follow: bool, timeout_s: float = 30.0) -> Iterator[decisions_pb2.Decision]:
    """The decisions of a tenant (and collection) on items.decisions, each item once (a repeat
    is a byte-identical copy). Without ``follow``, stops once it has read up to the end of
    every partition as it was when it started reading."""
    from twinstream.common.config import load_settings
    from twinstream.common.kafka import TopicReader

    settings = load_settings("cli").replace(kafka={"bootstrap": bootstrap})
    reader = TopicReader(settings, settings.topics.decisions)
    wanted = {decisions_pb2.DecisionKind.Value(k) for k in kinds}
    seen: set[bytes] = set()
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            for record in reader.poll(300):
                if record.key in seen:
                    continue
                decision = decisions_pb2.Decision.FromString(record.value)
                if decision.tenant != tenant or (collection and decision.collection != collection):
                    continue
                seen.add(record.key)
                if not wanted or decision.kind in wanted:
                    yield decision
            if follow:
                continue
            if reader.at_end():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {settings.topics.decisions} to its end in "
                                   f"{timeout_s:.0f}s; is the broker at {bootstrap} up?")
    finally:
        reader.close()


def cmd_decisions(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    count = 0
    try:
        for decision in read_decisions(args.kafka, args.tenant, args.collection, args.kind or [],
                                       args.follow):
            count += 1
            if args.json:
                print(json.dumps(MessageToDict(decision, preserving_proto_field_name=True)),
                      flush=True)
            else:
                print(describe(decision), flush=True)
    except KeyboardInterrupt:
        pass
    if not args.json:
        print(f"{count} decisions", file=sys.stderr)
    return 0


def accepted_items(tenant: str, collection: str, timeout_s: float) -> tuple[list[tuple[str, bytes]], bool]:
    """The collection's items retained on items.accepted, from the beginning to the high
    watermarks as of the read (the latest version of each item id); and whether the read got to those ends."""
    from twinstream.common.config import load_settings
    from twinstream.common.kafka import TopicReader

    settings = load_settings("cli")
    reader = TopicReader(settings, settings.topics.accepted)
    try:
        records = reader.read_until(lambda _: reader.at_end(), timeout_s)
        complete = reader.at_end()
    finally:
        reader.close()
    latest: dict[str, tuple[str, bytes]] = {}
    for record in records:
        accepted = items_pb2.AcceptedItem.FromString(record.value)  # written by ingestion, never raw input
        item = accepted.item
        if item.tenant == tenant and item.collection == collection:
            latest[item.item_id] = (items_pb2.Modality.Name(item.modality).lower(), item.content)
    return list(latest.values()), complete


def cmd_adapt(args: argparse.Namespace) -> int:
    """Adapt on a JSONL file of the collection's items, or on what items.accepted retains of it."""
    from twinstream.learn.adapt import read_jsonl
    from twinstream.learn.cli import run_adapt

    if args.items is not None:
        return run_adapt(args, read_jsonl(args.items), str(args.items))
    items, complete = accepted_items(args.tenant, args.collection, args.read_timeout)
    if not complete:
        print(f"adapt: items.accepted was not read to its end in {args.read_timeout:.0f}s; "
              f"adapting on the {len(items)} items read", file=sys.stderr)
    return run_adapt(args, items, "items.accepted")


def adapt_main(argv: list[str]) -> int:
    """``twinstream adapt``: its parser is built only when asked for (it imports the learning side)."""
    from twinstream.learn.cli import adapt_options

    parser = argparse.ArgumentParser(prog="twinstream adapt", description=cmd_adapt.__doc__)
    adapt_options(parser)
    parser.add_argument("--items", type=Path, default=None,
                        help="JSONL of the items (as for `ingest`); default: read them off items.accepted")
    parser.add_argument("--read-timeout", type=float, default=120.0, help="seconds to read items.accepted")
    return cmd_adapt(parser.parse_args(argv))


def cmd_reembed(args: argparse.Namespace) -> int:
    """An embedding instance for the new bundle, in its own consumer group from the earliest
    offset, so the whole retained items.accepted log is embedded beside the live version."""
    from twinstream.common.config import load_settings
    from twinstream.embedding.__main__ import main as embedding_main
    from twinstream.model.bundle import ModelBundle

    bundle = ModelBundle.load(args.bundle)
    settings = load_settings("embedding").replace(
        encoder={"model_dirs": [args.bundle]},
        kafka={"consumer_group": f"twinstream-reembed-{bundle.name}-v{bundle.version}"})
    embedding_main(settings)
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from twinstream.common.config import load_settings
    from twinstream.common.security import milvus_client_options
    from twinstream.common.vectorstore import VectorStore
    from twinstream.v1 import items_pb2

    settings = load_settings("cli")
    if args.milvus_uri:
        settings = settings.replace(milvus={"uri": args.milvus_uri})
    store = VectorStore(settings.milvus.uri, prefix=settings.milvus.collection_prefix,
                        connection=milvus_client_options(settings))
    target = store.collection_name(items_pb2.ModelRef(name=args.model, version=args.version))
    if not store.client.has_collection(target):
        print(f"no collection {target}: run `twinstream reembed` for that version first")
        return 2
    store.flush(target)
    store.switch_alias(args.model, target)
    print(f"{store.alias_name(args.model)} -> {target} ({store.count(target)} rows)")
    return 0


def cmd_dlq(args: argparse.Namespace) -> int:
    from twinstream.dlq import main as dlq_main

    return dlq_main(args.kafka, args.reason, args.tenant, args.dry_run)


def _delegate(module: str, argv: list[str]) -> int:
    entry = importlib.import_module(module)
    return int(entry.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    delegated = {"demo": "twinstream.demo", "base-bundle": "twinstream.learn.base"}
    learning = ("train", "evaluate", "temperature-study")  # subcommands of twinstream.learn.cli
    if argv and argv[0] in delegated:
        return _delegate(delegated[argv[0]], argv[1:])
    if argv and argv[0] in learning:
        return _delegate("twinstream.learn.cli", argv)
    if argv and argv[0] == "adapt":
        return adapt_main(argv[1:])
    from twinstream.demo import DEFAULT_BUNDLE

    parser = argparse.ArgumentParser(prog="twinstream", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ingestion", default="127.0.0.1:50051")
    parser.add_argument("--matching", default="127.0.0.1:50054")
    parser.add_argument("--ca-file", default="", help="CA that signed the servers' certificates")
    parser.add_argument("--token", default="", help="bearer token (default $TWINSTREAM_TOKEN)")
    parser.add_argument("--plaintext", action="store_true", help="no TLS (servers must allow it)")
    commands = parser.add_subparsers(dest="command", required=True)
    for name in (*delegated, *learning):
        commands.add_parser(name, help=f"see `twinstream {name} --help`")
    ingest = commands.add_parser("ingest", help="send files to ingestion")
    ingest.add_argument("files", type=Path, nargs="+")
    ingest.add_argument("--tenant", required=True)
    ingest.add_argument("--collection", default="default")
    ingest.add_argument("--assign-ids", action="store_true",
                        help="let ingestion derive ids from content for items without one")
    ingest.set_defaults(run=cmd_ingest)
    match = commands.add_parser("match", help="top-k similar items")
    match.add_argument("--tenant", required=True)
    match.add_argument("--collection", default="default")
    query = match.add_mutually_exclusive_group(required=True)
    query.add_argument("--id")
    query.add_argument("--text")
    query.add_argument("--file", type=Path)
    match.add_argument("-k", type=int, default=10)
    match.add_argument("--min-score", type=float, default=0.0)
    match.add_argument("--where", action="append", help="metadata KEY=VALUE (repeatable)")
    match.set_defaults(run=cmd_match)
    stack = commands.add_parser("stack", help="run the local stack (`stack up`)")
    stack.add_argument("action", choices=["up"])
    stack.add_argument("--bundle", type=Path, action="append", default=None)
    stack.add_argument("--broker-storage", choices=["s3", "memory"], default="s3",
                       help="s3: tansu on SeaweedFS, survives restarts (default); memory: faster, volatile")
    stack.add_argument("--milvus", choices=["server", "lite"], default="server",
                       help="server: Milvus 2.3 standalone with HNSW (default); lite: Milvus Lite, exact scans")
    stack.set_defaults(run=cmd_stack)
    status = commands.add_parser("status", help="one screen: rates, lag, decisions, DLQ, health")
    status.add_argument("--prometheus", default="http://127.0.0.1:9090")
    status.add_argument("--health", action="append", metavar="STAGE=HOST:PORT",
                        help="gRPC address of embedding/indexing (default 50052/50053)")
    status.set_defaults(run=cmd_status)
    decisions = commands.add_parser("decisions", help="read decisions back from items.decisions")
    decisions.add_argument("--tenant", required=True)
    decisions.add_argument("--collection", default="", help="default: every collection")
    decisions.add_argument("--kind", action="append",
                           choices=[decisions_pb2.DecisionKind.Name(v)
                                    for v in decisions_pb2.DecisionKind.values() if v],
                           help="only these kinds (repeatable)")
    decisions.add_argument("--follow", action="store_true", help="keep printing new decisions")
    decisions.add_argument("--json", action="store_true", help="one JSON object per line")
    decisions.add_argument("--kafka", default="127.0.0.1:9092", help="broker bootstrap address")
    decisions.set_defaults(run=cmd_decisions)
    commands.add_parser("adapt", help="fine-tune a new model version on a collection's own items "
                                      "(see `twinstream adapt --help`)")
    reembed = commands.add_parser("reembed", help="embed the retained stream with a new model version")
    reembed.add_argument("--bundle", type=Path, required=True)
    reembed.set_defaults(run=cmd_reembed)
    promote = commands.add_parser("promote", help="make a model version live (alias switch)")
    promote.add_argument("--model", required=True)
    promote.add_argument("--version", required=True)
    promote.add_argument("--milvus-uri", default="")
    promote.set_defaults(run=cmd_promote)
    token = commands.add_parser("token", help="issue a bearer token (`token issue`)")
    token.add_argument("action", choices=["issue"])
    token.add_argument("--tenant", action="append", required=True,
                       help="tenant(s) it may use, comma-separated or repeated; '*' for all")
    token.add_argument("--scopes", default="ingest,match", help=f"some of {','.join(SCOPES)}")
    token.add_argument("--ttl", type=_ttl_seconds, default=3600, help="lifetime: 90s, 15m, 1h, 7d")
    token.add_argument("--subject", default=os.environ.get("USER", "cli"), help="who holds it")
    token.add_argument("--key-file", default="",
                       help="signing key (default $TWINSTREAM_AUTH_TOKEN_KEY_FILE, else the local stack's)")
    token.set_defaults(run=cmd_token)

    dlq = commands.add_parser("dlq", help="dead letters: `dlq redrive --reason R`")
    dlq.add_argument("action", choices=["redrive"])
    dlq.add_argument("--reason", required=True, help="e.g. unknown_model_version")
    dlq.add_argument("--tenant", default="", help="only this tenant's letters")
    dlq.add_argument("--dry-run", action="store_true", help="count what would be re-driven; publish nothing")
    dlq.add_argument("--kafka", default="127.0.0.1:9092", help="broker bootstrap address")
    dlq.set_defaults(run=cmd_dlq)
    args = parser.parse_args(argv)
    if getattr(args, "bundle", "unset") is None:
        args.bundle = [DEFAULT_BUNDLE]
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
