"""Write the placeholder model bundled until trained weights ship (issue: training).

The weights are the network's He-normal initialization with a fixed seed: the file
exercises the whole path (loading, metadata, inference) but its labels mean nothing.
Run: python scripts/make_untrained_model.py
"""
from __future__ import annotations

import datetime

import torch

from ILDSegmentationLib.engine.modelfile import ModelInfo, default_model_path, save_model
from ILDSegmentationLib.engine.network import DilatedFCN, NetworkConfig

SEED = 0


def main() -> None:
    torch.manual_seed(SEED)
    config = NetworkConfig()
    info = ModelInfo(
        name="untrained placeholder (paper architecture, random weights)",
        network=config,
        trained=False,
        provenance={
            "trained_on": "nothing: He-normal random initialization, torch seed 0",
            "command": "python scripts/make_untrained_model.py",
            "created": datetime.date.today().isoformat(),
            "metrics": {},
            "warning": "UNTRAINED: labels produced with these weights are meaningless. Not for clinical use.",
        },
    )
    print(save_model(default_model_path(), DilatedFCN(config), info))


if __name__ == "__main__":
    main()
