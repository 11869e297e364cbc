"""``solm eval``'s static floor (issue 18): the ``layers`` calibration, loaded from ``--floor FILE`` or measured on
the training genres' validation split (and then written to ``--floor FILE`` when given), and the calibration
blocks ``floor`` chooses uniform, schedule or layers on. Never the evaluated text: the floor is fixed before it."""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

FLOOR_HELP = ("static policy file (JSON) of the per-layer calibration: loaded if it exists, else measured on the "
              "training genres' validation split and written there; adds the layers and floor rows")


def floor_data(lm, loaded, grid, args):
    """(LayerCosts, the floor's choice blocks [n, ctx+T+1], what the result records of the calibration)."""
    from solm_compile.data import genres
    from solm_compile.errors import UserError
    from solm_compile.eval import floor as fl
    from solm_compile.policy.checkpoint import model_identity
    from solm_compile.train.data import genre_blocks

    train = genres.MIXTURE.train_genres
    try:
        blocks, _ = genre_blocks(loaded.tokenizer, train, args.ctx + args.T + 1, 2 * args.calib_blocks,
                                 "validation", seed=args.seed + 2)
    except UserError as e:
        raise UserError(f"--calib-blocks {args.calib_blocks}: {e}") from e
    fit_blocks, choose_blocks = blocks[0::2], blocks[1::2]        # both halves hold every genre
    ident = model_identity(loaded.info)
    path = Path(args.floor) if args.floor else None
    t0 = time.perf_counter()
    if path is not None and path.is_file():
        costs, d = fl.load_static(path, ident, lm.gate.mlp_skip)
        calibration = d["calibration"]
        log.info("loaded the per-layer calibration from %s", path)
    else:
        if path is not None and not path.parent.is_dir():
            raise UserError(f"--floor {path}: directory {path.parent} does not exist")
        costs = fl.fit_layer_costs(lm, fit_blocks, grid, args.ctx, args.calib_steps, args.batch_rows)
        calibration = {"data": f"validation split of {', '.join(train)}: {fit_blocks.shape[0]} blocks, every other "
                       f"one of {blocks.shape[0]} drawn evenly per genre", "ctx": args.ctx, "steps": args.calib_steps, "seed": args.seed + 2,
                       "gate": lm.gate.to_dict(), "fit_s": round(time.perf_counter() - t0, 1),
                       "mixture": genres.record(genres.MIXTURE)}
        if path is not None:
            fl.save_static(path, costs, ident, loaded.info.name, calibration)
    info = {"file": str(path) if path else None, "choice_blocks": int(choose_blocks.shape[0]),
            "calibration": {k: v for k, v in calibration.items() if k != "mixture"},
            "layer_costs": costs.to_dict()}
    return costs, choose_blocks, info
