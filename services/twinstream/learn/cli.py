"""``python -m twinstream.learn {train,evaluate,temperature-study,loss-study,adapt,base} ...``

``main(argv)`` also accepts the train options alone (``twinstream train --modality ...``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from twinstream.learn.modalities import IMAGE_BUNDLE, TEXT_BUNDLE, DataSizes, ModelOptions

# Per-modality defaults, chosen by measurement (docs/learn.md): minutes on two CPU cores.
DEFAULT_EPOCHS = {"record": 2, "text": 2, "image": 10}
COMMANDS = ("train", "evaluate", "temperature-study", "loss-study", "adapt", "base")


def _sizes(parser: argparse.ArgumentParser) -> None:
    defaults = DataSizes()
    parser.add_argument("--train-entities", type=int, default=defaults.train_entities)
    parser.add_argument("--eval-views", type=int, default=defaults.eval_views,
                        help="views in each of the validation and test splits")
    parser.add_argument("--reference-views", type=int, default=defaults.reference_views,
                        help="in-distribution views for the OOD prototypes")
    parser.add_argument("--ood-views", type=int, default=defaults.ood_views)


def _training(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--modality", choices=["text", "record", "image"], required=True)
    parser.add_argument("--loss", choices=["contrastive", "triplet", "infonce"], default="infonce")
    parser.add_argument("--temperature", type=float, default=0.05, help="InfoNCE temperature")
    parser.add_argument("--margin", type=float, default=None,
                        help="contrastive (default 1.0) or triplet (default 0.2) margin")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"default per modality: {DEFAULT_EPOCHS}")
    parser.add_argument("--batch-entities", type=int, default=64)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1")
    parser.add_argument("--text-tuning", choices=["finetune", "head"], default="finetune",
                        help="finetune: train MiniLM's top layers; head: frozen MiniLM + residual head")
    parser.add_argument("--trainable-layers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--no-progress", action="store_true")
    _sizes(parser)


def _config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from twinstream.learn.train import TrainConfig

    return TrainConfig(
        modality=args.modality, loss=args.loss, temperature=args.temperature, margin=args.margin,
        epochs=DEFAULT_EPOCHS[args.modality] if args.epochs is None else args.epochs,
        batch_entities=args.batch_entities, learning_rate=args.lr, seed=args.seed, device=args.device,
        sizes=DataSizes(args.train_entities, args.eval_views, args.reference_views, args.ood_views),
        options=ModelOptions(text_tuning=args.text_tuning, trainable_layers=args.trainable_layers,
                             image_size=args.image_size))


def _version(out: Path, given: str | None, modality: str) -> str:
    """--version, else the out folder's name when it is a number (``<models>/<name>/<version>``),
    else 2 for the text family (the base bundle is 1) and 1 for images."""
    if given:
        return given
    if out.name.isdigit():
        return out.name
    return "1" if modality == "image" else "2"


def cmd_train(args: argparse.Namespace) -> int:
    from twinstream.learn.train import run_training

    manifest = run_training(_config(args), args.out, _version(args.out, args.version, args.modality),
                            progress=not args.no_progress)
    training = manifest["training"]
    assert isinstance(training, dict)
    print(json.dumps({"bundle": str(args.out), "name": manifest["name"], "version": manifest["version"],
                      "thresholds": manifest["thresholds"], "final_epoch": training["final"],
                      "train_seconds": training["train_seconds"]}, indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from twinstream.learn.evaluate import evaluate, markdown, write_report

    sizes = DataSizes(0, args.eval_views, args.reference_views, args.ood_views)
    report = evaluate(args.modality, args.bundle, args.base, sizes, args.seed, args.device)
    text = markdown(report)
    write_report(args.out, f"evaluation-{args.modality}", report, text)
    print(text)
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from twinstream.learn.evaluate import loss_study, study_markdown, temperature_study, write_report

    if args.command == "temperature-study":
        study = temperature_study(args.modality, args.temperatures, _config(args), not args.no_progress)
    else:
        study = loss_study(args.modality, args.losses, _config(args), not args.no_progress)
    text = study_markdown(study)
    write_report(args.out, f"{args.command}-{args.modality}", study, text)
    print(text)
    return 0


def adapt_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``adapt`` (also used by ``twinstream adapt``, which can read the items off
    the stream instead of a file)."""
    from twinstream.learn.adapt import AdaptConfig

    defaults = AdaptConfig()
    parser.add_argument("--tenant", required=True)
    parser.add_argument("--collection", default="default")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"bundle folder (default var/models/{TEXT_BUNDLE}/<next version>)")
    parser.add_argument("--models", type=Path, default=Path("var/models"),
                        help="where the next version is counted from when --out is not given")
    parser.add_argument("--version", default=None, help="bundle version (default: the out folder's name)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--copies", type=int, default=defaults.copies, help="corrupted views per item")
    parser.add_argument("--max-items", type=int, default=defaults.max_items)
    parser.add_argument("--text-tuning", choices=["finetune", "head"], default=defaults.text_tuning,
                        help="finetune: MiniLM's top layers; head: frozen MiniLM + residual head (fastest)")
    parser.add_argument("--calibration-views", type=int, default=defaults.calibration_views,
                        help="views of the other kind the bundle serves, to keep its thresholds")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--no-progress", action="store_true")


def run_adapt(args: argparse.Namespace, items: list[tuple[str, bytes]], source: str) -> int:
    """Adapt on ``items`` (kind, content) and print where the bundle went and what comes next."""
    from twinstream.learn.adapt import AdaptConfig, AdaptError, adapt, next_version

    out = args.out or args.models / TEXT_BUNDLE / next_version(args.models)
    version = args.version or (out.name if out.name.isdigit() else next_version(args.models))
    config = AdaptConfig(epochs=args.epochs, copies=args.copies, max_items=args.max_items,
                         text_tuning=args.text_tuning, seed=args.seed, device=args.device,
                         calibration_views=args.calibration_views)
    what = f"tenant {args.tenant} collection {args.collection}"
    try:
        manifest = adapt(items, out, version, config, {"tenant": args.tenant, "collection": args.collection,
                                                       "what": what, "source": source},
                         progress=not args.no_progress)
    except AdaptError as exc:
        print(f"adapt: {exc}", file=sys.stderr)
        return 2
    training = manifest["training"]
    assert isinstance(training, dict)
    print(json.dumps({"bundle": str(out), "name": manifest["name"], "version": manifest["version"],
                      "items": training["adapted"]["items"], "kind": training["adapted"]["kind"],
                      "thresholds": manifest["thresholds"], "seconds": training["seconds"],
                      "next": [f"twinstream reembed --bundle {out}",
                               f"twinstream promote --model {manifest['name']} --version {manifest['version']}"]},
                     indent=2))
    return 0


def cmd_adapt(args: argparse.Namespace) -> int:
    from twinstream.learn.adapt import read_jsonl

    return run_adapt(args, read_jsonl(args.items), str(args.items))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m twinstream.learn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a Siamese encoder and write a model bundle")
    _training(train)
    train.add_argument("--out", type=Path, required=True,
                       help=f"bundle folder, e.g. var/models/{TEXT_BUNDLE}/2 or var/models/{IMAGE_BUNDLE}/1")
    train.add_argument("--version", default=None, help="bundle version (default: see docs/learn.md)")
    train.set_defaults(run=cmd_train)
    evaluate = commands.add_parser("evaluate", help="base vs trained on the held-out test split")
    evaluate.add_argument("--modality", choices=["text", "record", "image"], required=True)
    evaluate.add_argument("--bundle", type=Path, required=True, help="the trained bundle")
    evaluate.add_argument("--base", type=Path, default=None,
                          help="a base bundle (default: the untrained tower, calibrated in memory)")
    evaluate.add_argument("--seed", type=int, default=None, help="default: the bundle's training seed")
    evaluate.add_argument("--out", type=Path, required=True, help="folder for the .md and .json report")
    evaluate.add_argument("--device", default="auto")
    _sizes(evaluate)
    evaluate.set_defaults(run=cmd_evaluate)
    study = commands.add_parser("temperature-study", help="InfoNCE at several temperatures")
    _training(study)
    study.add_argument("--temperatures", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2])
    study.add_argument("--out", type=Path, required=True)
    study.set_defaults(run=cmd_study)
    losses = commands.add_parser("loss-study", help="contrastive vs triplet vs InfoNCE")
    _training(losses)
    losses.add_argument("--losses", nargs="+", default=["contrastive", "triplet", "infonce"])
    losses.add_argument("--out", type=Path, required=True)
    losses.set_defaults(run=cmd_study)
    adapt = commands.add_parser("adapt", help="self-supervised fine-tuning on one collection's own items")
    adapt_options(adapt)
    adapt.add_argument("--items", type=Path, required=True,
                       help="JSONL of the collection's items ({\"record\": {...}} or {\"text\": ...} per line)")
    adapt.set_defaults(run=cmd_adapt)
    commands.add_parser("base", help="build the untrained base bundle: base --out DIR [--seed N]")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "base":
        from twinstream.learn.base import main as base_main

        return base_main(argv[1:])
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["train", *argv]  # `twinstream train --modality ...` hands over the options only
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
