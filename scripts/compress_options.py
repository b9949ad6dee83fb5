"""The options `compress-vit` and `compress-lm` share: `lowrank_vit.MixedRankConfig`'s fields as flags.

Not a subcommand (cli.COMMANDS does not list it): the two commands' `add_parser` and `run` call it.
"""

from __future__ import annotations


def add_config_options(p, keep_example: str) -> None:
    """--keep, --method, --residual-rank, --compensate-steps, --compensate-factors, --lr, --targets,
    --int8 and --seed, with MixedRankConfig's defaults."""
    from lowrank_vit.config import METHODS, ROLES, MixedRankConfig

    defaults = MixedRankConfig()
    p.add_argument("--keep", type=float, default=defaults.keep,
                   help=f"fraction of the targeted layers' parameters kept ({keep_example})")
    p.add_argument("--method", default=defaults.method, choices=METHODS)
    p.add_argument("--residual-rank", type=int, default=defaults.residual_rank,
                   help="rank of the compensation residual term (aa-mixed)")
    p.add_argument("--compensate-steps", type=int, default=defaults.compensate_steps,
                   help="Adam steps of layer-wise error compensation per layer (aa-mixed; 0 = none)")
    p.add_argument("--compensate-factors", action="store_true", help="also train the principal factors in compensation")
    p.add_argument("--lr", type=float, default=defaults.lr, help="compensation learning rate")
    p.add_argument("--targets", nargs="+", default=list(ROLES), choices=ROLES, help="which linear roles to compress")
    p.add_argument("--int8", action="store_true", help="store the low-rank factors as int8 after compression")
    p.add_argument("--seed", type=int, default=defaults.seed)


def config_from_args(args, calib_images: int):
    """The MixedRankConfig the options describe; `calib_images`: calibration images or token blocks."""
    from lowrank_vit.config import MixedRankConfig

    return MixedRankConfig(
        keep=args.keep, method=args.method, residual_rank=args.residual_rank, compensate_steps=args.compensate_steps,
        compensate_factors=args.compensate_factors, lr=args.lr, calib_images=calib_images, targets=tuple(args.targets),
        int8=args.int8, seed=args.seed,
    )
