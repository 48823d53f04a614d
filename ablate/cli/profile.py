"""`ablate profile`: parameters and MACs of a backbone with an SCConv variant."""

from __future__ import annotations

import argparse
import json

from ablate.cli.common import add_scconv_args, choices_type, scconv_overrides
from ablate.config import PLACEMENTS, ModelConfig, RunConfig, blame_user_keys
from ablate.errors import ConfigError

FORMATS = ("table", "json")


def register(sub) -> None:
    """Add the ``profile`` command to the ``ablate`` parser."""
    p = sub.add_parser("profile", help="params and MACs of a backbone with an SCConv variant",
                       description="Count parameters and MACs (conv/linear multiply-accumulates, FLOPs/2).")
    p.add_argument("--backbone", default="resnet50", help="resnet20, resnet56, resnet50, densenet121 (default resnet50)")
    p.add_argument("--num-classes", type=int, default=1000, help="classifier outputs (default 1000)")
    p.add_argument("--image-size", type=int, default=224, help="input side in pixels (default 224)")
    p.add_argument("--placement", type=choices_type("placement", PLACEMENTS), default="replace",
                   help="DenseNet: replace the 3x3 conv or insert SCConv before it")
    p.add_argument("--compare", action="store_true", help="add the order=none baseline and ratios against it")
    p.add_argument("--format", type=choices_type("format", FORMATS), default="table", help="table or json")
    add_scconv_args(p)
    p.set_defaults(func=cmd_profile)


def cmd_profile(args: argparse.Namespace) -> int:
    """Print one row per model (and the baseline with ``--compare``) as a table or JSON."""
    from ablate.profile import format_table, profile_rows

    given = scconv_overrides(args)
    scconv = RunConfig.from_dict(given).model.scconv
    model_cfg = ModelConfig(backbone=args.backbone, num_classes=args.num_classes, placement=args.placement, scconv=scconv)
    try:
        rows = profile_rows(model_cfg, image_size=args.image_size, compare=args.compare)
    except ConfigError as e:
        raise blame_user_keys(e, given) from None
    print(json.dumps(rows, indent=2) if args.format == "json" else format_table(rows))
    return 0
