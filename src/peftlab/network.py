"""Network use: a run reaches for the network only when its config names a hub id.

A hub id is a model (`model.name_or_path`, `model.tokenizer`) that is not a builtin alias, a `.gguf`
file or a local folder, or a data source path that is neither `demo:` nor a local file. When the
config names none, the process goes into Hugging Face offline mode before anything loads:
huggingface_hub, transformers and datasets then make no request, and importing bitsandbytes on a CPU
with AVX512-BF16, which asks the `kernels` package for a native 4-bit kernel from the hub
(`bitsandbytes/backends/cpu/ops.py`), looks only in the local cache and falls back to bitsandbytes'
own CPU kernels. A config that names a hub id leaves the settings as the user has them.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from peftlab.config import StudyConfig
from peftlab.data.sources import names_hub_dataset
from peftlab.models.loading import names_hub_model

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def hub_ids(config: StudyConfig) -> list[str]:
    """The hub ids the config names (models and data sources), in config order."""
    model = config.model
    models = [model.tokenizer or model.name_or_path]
    if model.config is None:  # with model.config the weights are random: name_or_path loads nothing else
        models.append(model.name_or_path)
    found = [name for name in models if names_hub_model(name)]
    found += [source.path for source in config.data.sources if names_hub_dataset(source.path)]
    return list(dict.fromkeys(found))


def offline_unless_hub(config: StudyConfig) -> bool:
    """Put this process (and those it starts) in offline mode when the config names no hub id;
    returns whether it did."""
    if hub_ids(config):
        return False
    for variable in OFFLINE_VARIABLES:
        os.environ[variable] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:  # already imported: it read the environment then
        constants.HF_HUB_OFFLINE = True
    return True


@contextlib.contextmanager
def network_settings_restored() -> Iterator[None]:
    """Restore the offline settings on exit (for a command run inside a longer-lived process)."""
    saved = {variable: os.environ.get(variable) for variable in OFFLINE_VARIABLES}
    constants = sys.modules.get("huggingface_hub.constants")
    saved_constant = constants.HF_HUB_OFFLINE if constants is not None else None
    try:
        yield
    finally:
        for variable, value in saved.items():
            if value is None:
                os.environ.pop(variable, None)
            else:
                os.environ[variable] = value
        constants = sys.modules.get("huggingface_hub.constants")
        if constants is not None:
            constants.HF_HUB_OFFLINE = bool(saved_constant) if saved_constant is not None else (
                os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"})
