"""``twinstream``: the command users reach for first.

  twinstream demo                      start the stack, stream FEBRL, print a report
  twinstream stack up                  run the local stack on the default ports until Ctrl-C
  twinstream ingest FILE...            send JSONL/text/image files to ingestion
  twinstream match ...                 top-k similar items for an item id, text or file
  twinstream train|evaluate|temperature-study ...   the learning side (see docs/learn.md)
  twinstream base-bundle --out DIR     build the untrained MiniLM bundle
  twinstream adapt --tenant T --collection C   fine-tune a new model version on that collection's
                                       own items, no labels (docs/learn.md)
  twinstream reembed --bundle DIR      fill a new model version's collection from items.accepted
  twinstream promote --model M --version V   switch the live alias to that version
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from twinstream.v1 import items_pb2, matching_pb2

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp"}


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

    with TwinstreamClient(args.ingestion, args.matching) as client:
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
    with TwinstreamClient(args.ingestion, args.matching) as client:
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
    from twinstream.devstack import LocalStack, StackConfig

    stack = LocalStack(StackConfig(bundles=args.bundle, fixed_ports=True))
    stack.start()
    print(f"stack up: ingestion {stack.grpc_target('ingestion')}, matching "
          f"{stack.grpc_target('matching')}, Kafka {stack.kafka_bootstrap}, Milvus "
          f"{stack.milvus_uri}, Triton {stack.triton_url}, Prometheus {stack.prometheus_url}")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()
    return 0


def accepted_items(tenant: str, collection: str, timeout_s: float) -> tuple[list[tuple[str, bytes]], bool]:
    """The collection's items retained on items.accepted, from the beginning to the end offsets
    as of now (the latest version of each item id); and whether the read got to those ends."""
    from twinstream.common.config import Settings
    from twinstream.common.kafka import TopicReader

    settings = Settings.from_env("cli")
    reader = TopicReader(settings, settings.topics.accepted)
    try:
        ends = reader.consumer.end_offsets(reader.partitions)

        def caught_up(_: object) -> bool:
            return all(reader.consumer.position(tp) >= end for tp, end in ends.items())

        records = reader.read_until(caught_up, timeout_s) if any(ends.values()) else []
        complete = caught_up(None)
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
    import os

    from twinstream.common.bundle import ModelBundle
    from twinstream.embedding.__main__ import main as embedding_main

    bundle = ModelBundle.load(args.bundle)
    os.environ["TWINSTREAM_MODEL_DIR"] = str(args.bundle)
    os.environ["TWINSTREAM_CONSUMER_GROUP"] = f"twinstream-reembed-{bundle.name}-v{bundle.version}"
    embedding_main()
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from twinstream.common.config import Settings
    from twinstream.common.vectorstore import VectorStore
    from twinstream.v1 import items_pb2

    settings = Settings.from_env("cli")
    store = VectorStore(args.milvus_uri or settings.milvus_uri, settings.milvus_token,
                        settings.milvus_collection_prefix)
    target = store.collection_name(items_pb2.ModelRef(name=args.model, version=args.version))
    if not store.client.has_collection(target):
        print(f"no collection {target}: run `twinstream reembed` for that version first")
        return 2
    store.flush(target)
    store.switch_alias(args.model, target)
    print(f"{store.alias_name(args.model)} -> {target} ({store.count(target)} rows)")
    return 0


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
    stack.set_defaults(run=cmd_stack)
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
    args = parser.parse_args(argv)
    if getattr(args, "bundle", "unset") is None:
        args.bundle = [DEFAULT_BUNDLE]
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
