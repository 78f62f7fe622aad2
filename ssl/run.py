"""SSL and metric-learning pipeline: `python ssl/run.py [key=value ...]`.

The run itself is `shared.train.run` (shared with product-matching/run.py): seed -> data
module, module, callbacks, loggers, trainer from the `_target_` groups in conf/ -> fit ->
test -> the metric a sweeper maximises. Config: conf/ssl.yaml.
"""

import hydra
from omegaconf import DictConfig

from shared.train import run


@hydra.main(version_base="1.3", config_path="../conf", config_name="ssl")
def main(cfg: DictConfig) -> float | None:
    return run(cfg)


if __name__ == "__main__":
    main()
