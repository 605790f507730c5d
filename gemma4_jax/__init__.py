"""gemma4-jax: Gemma 4 text models in JAX, loaded from GGUF, with Pallas GPU kernels.

    import gemma4_jax as g4
    model = g4.load("gemma-4-E4B-it-Q8_0.gguf", dtype="bfloat16")
    ids = model.tokenizer.encode("The capital of France is")
    out = g4.generate(model.params, [ids], max_new_tokens=32, sampler=g4.TopP(0.95))
    print(model.tokenizer.decode(out.tokens[0]))

`forward`, `prefill`, `decode_step` and `generate` are functions of the params pytree, which
carries the model config as static metadata.
"""

from .config import Gemma4Config, LayerSpec, Segment, layer_plan, segments
from .errors import ConfigError, Gemma4Error, GGUFError, InputError
from .generate import (
    GenerationResult,
    decode_step,
    generate,
    generate_stream,
    init_cache,
    prefill,
)
from .loader import Model, load
from .model import forward
from .ops import kernel_mode, use_kernels
from .params import Params
from .sampling import Greedy, MinP, Temperature, TopK, TopP

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "GGUFError",
    "Gemma4Config",
    "Gemma4Error",
    "GenerationResult",
    "Greedy",
    "InputError",
    "LayerSpec",
    "MinP",
    "Model",
    "Params",
    "Segment",
    "Temperature",
    "TopK",
    "TopP",
    "decode_step",
    "forward",
    "generate",
    "generate_stream",
    "init_cache",
    "kernel_mode",
    "layer_plan",
    "load",
    "prefill",
    "segments",
    "use_kernels",
]
