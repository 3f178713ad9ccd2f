"""``train.compile``: torch.compile of the student and every adaptor head, in place.

* In place (``nn.Module.compile``): the modules keep their names, so checkpoint, EMA and export
  keys are those of an eager run (a wrapper would prefix them with ``_orig_mod.``), and DDP,
  DAMP's in-place weight noise and resume act on the same parameters.
* Random draws inside the compiled code (the CPE crop, position dropout) use torch's own
  generator (inductor's ``fallback_random``): a compiled run draws what an eager run draws, so
  the two give the same losses and a run can resume with compile switched on or off.
* Shapes (``train.compile_dynamic``): null lets torch decide (a static graph for the first
  input shape, one dynamic-shape graph once a second appears); false compiles once per
  resolution (the recompile limit is raised to fit every resolution the recipe trains at);
  true compiles one dynamic-shape graph from the start.
* Evaluation, reports and exports run the modules eagerly (``eager()``): eval mode and their
  resolutions would otherwise each cost a compile.
* MESA's EMA copy is made before compiling and stays eager (it only runs forward, without
  gradients).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

#: inductor options of every compiled module (see the module doc)
OPTIONS = {"fallback_random": True}


def compile_model(distiller: nn.Module, dynamic: Optional[bool], shapes: int) -> list[str]:
    """Compile ``distiller.student`` and its heads in place; ``shapes``: how many input shapes
    the student trains at. Returns the compiled modules' names."""
    import torch._dynamo

    # Each head also sees a one-token shape (teachers absent from a batch) besides the full one.
    limit = 2 * shapes + 2
    if torch._dynamo.config.recompile_limit < limit:
        torch._dynamo.config.recompile_limit = limit
    names = []
    for name, module in distiller.named_children():
        if name == "student":
            module.compile(dynamic=dynamic, options=OPTIONS)
            names.append(name)
        elif name in ("summary_heads", "spatial_heads"):
            for head_name, head in module.items():
                head.compile(dynamic=dynamic, options=OPTIONS)
                names.append(f"{name}.{head_name}")
    return names


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Compiled modules run their eager forward inside (a no-op for eager modules)."""
    with torch.compiler.set_stance("force_eager"):
        yield
