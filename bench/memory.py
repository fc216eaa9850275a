"""Peak memory of `convert` (verify included) against loading its result and one forward pass.

    python -m fastvlm_mlx.bench.memory --random 0.5b

A random checkpoint of the published shapes is written in the HF/LLaVA layout,
in bfloat16 as published. Then, each in a fresh process, so each peak is its own:
`convert` with its verify step; loading the result plus one image encode and
prefill (what any use of the model needs); and the same with the converted model
still held, which is what `convert` peaked at while verify loaded a second copy.
Each prints its peak resident memory (ru_maxrss).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import typer
from mlx.utils import tree_flatten

from fastvlm_mlx.errors import FastVLMError, exit_codes

from .compare import write_hf_checkpoint
from .harness import DECODERS, random_config, random_model

PEAK = "import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
FORWARD = """
from fastvlm_mlx.utils import load
from fastvlm_mlx.generation import prefill
from mlx_lm.models.cache import make_prompt_cache
model, _ = load({out!r})
side = model.args.vision_config.image_size
features = model.encode_image(mx.zeros((1, side, side, 3)))
mx.eval(prefill(model, [1, -200, 2], features, make_prompt_cache(model.language_model)))
"""
CASES = {
    "convert (verify included)": "from fastvlm_mlx.convert import convert\nconvert({hf!r}, {out!r})",
    "load + one forward": FORWARD,
    "converted model held + load + forward": (
        "from fastvlm_mlx.utils import build_model, load_config, load_weights\n"
        "held = build_model(load_config(Path({hf!r})), load_weights(Path({hf!r})), None, 'hf')\n" + FORWARD),
}


def peak_bytes(code: str) -> int:
    """Peak resident memory of a fresh Python process running `code`."""
    script = f"from pathlib import Path\nimport mlx.core as mx\n{code}\n{PEAK}"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def main(random_size: str = typer.Option("0.5b", "--random", help="Published shapes: 0.5b, 1.5b or 7b.")) -> None:
    with exit_codes(), tempfile.TemporaryDirectory() as tmp:
        if random_size not in DECODERS:
            raise FastVLMError(f"--random takes one of {', '.join(DECODERS)}, got {random_size!r}")
        config = random_config(random_size)
        model = random_model(config, mx.bfloat16)
        model.set_dtype(mx.bfloat16)  # the tower too, as in the published files
        weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
        hf = str(write_hf_checkpoint(model, config, Path(tmp) / "hf"))
        del model
        out = str(Path(tmp) / "converted")
        print(f"random apple/FastVLM-{random_size.upper()} shapes, bfloat16 on disk: {weights / 1e9:.2f} GB; "
              f"device {mx.default_device()}")
        for name, code in CASES.items():
            print(f"  {name:<40} peak RSS {peak_bytes(code.format(hf=hf, out=out)) / 1e9:6.2f} GB", flush=True)


if __name__ == "__main__":
    typer.run(main)
