"""Save a benchmark workload's random-init model as a local checkpoint (no tokenizer), so that the main job
(recipes/generate.py, which loads models by path) can run the workload's shape, e.g. for the DDP scaling run:

    python recipes/bench/save_model.py w1 /tmp/w1_model
    python recipes/generate.py model=pretrained model.name=/tmp/w1_model data=random trainer=ddp ...
"""

from __future__ import annotations

import os
import sys

import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.workloads import Workload  # noqa: E402

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "conf", "workload")


def main(name: str, path: str) -> None:
    with open(os.path.join(CONF, f"{name}.yaml"), encoding="utf-8") as f:
        workload = Workload.from_dict(yaml.safe_load(f))
    workload.build_model("cpu").save_pretrained(path)
    print(f"saved the {name} model shape ({workload.model['model_type']}) to {path}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: save_model.py WORKLOAD DIR")
    main(sys.argv[1], sys.argv[2])
