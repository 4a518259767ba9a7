"""lungcore.models: the two networks (CMML, CSF-Net), built only from lungcore.nn and torch.nn."""
from lungcore.models.registry import (  # noqa: F401
    available_models,
    create,
    load_model,
    read_checkpoint,
    register_model,
    save_model,
)
from lungcore.models.csfnet import CSFNet, CSFNetConfig  # noqa: F401,E402
from lungcore.models.cmml import CMML, CMMLConfig  # noqa: E402,F401
