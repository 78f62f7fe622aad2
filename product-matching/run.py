"""Product-matching pipeline: `python product-matching/run.py [key=value ...]`.

Trains an embedding net (DOLG or CGD) with a Sub-center ArcFace head on all folds but
`data.fold`, evaluates best-threshold F1 on that fold, and keeps the threshold in the
checkpoint for `product-matching/infer.py`. Config: conf/matching.yaml; the run itself is
`shared.train.run`, shared with ssl/run.py.
"""

import sys

import hydra
from omegaconf import DictConfig

from matching.data import refuse_moved_keys
from shared.train import run


@hydra.main(version_base="1.3", config_path="../conf", config_name="matching")
def main(cfg: DictConfig) -> float | None:
    return run(cfg)


if __name__ == "__main__":
    refuse_moved_keys(sys.argv[1:])
    main()
