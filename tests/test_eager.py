"""``eager_only``: importing the package does not import ``torch._dynamo``, and a function
decorated before ``torch._dynamo`` is loaded is skipped by ``torch.compile`` as
``torch.compiler.disable`` skips it (runs eagerly, one graph break at the call, the
``fullgraph=True`` error). Checked in a fresh interpreter: this one may have loaded dynamo."""

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.distributed  # a fresh interpreter

SCRIPT = """
    import json, sys
    import torch
    import moe_parallel
    from moe_parallel.eager import eager_only

    out = {"dynamo_after_import": "torch._dynamo" in sys.modules}
    seen = []

    def side(x):
        seen.append(torch.compiler.is_compiling())
        return x.sum().item()  # data-dependent: fullgraph cannot take it

    lazy = eager_only(side)
    out["dynamo_after_decorating"] = "torch._dynamo" in sys.modules

    def f(x, g):
        return x * g(x) + 1

    x = torch.randn(5, dtype=torch.float64)
    want = f(x, side)
    seen.clear()
    import torch._dynamo
    from torch._dynamo.utils import counters
    runs = {}
    for name, g in (("lazy", lazy), ("disable", torch.compiler.disable(side))):
        torch._dynamo.reset()
        counters.clear()
        got = torch.compile(f, backend="eager")(x, g)
        runs[name] = {"equal": bool(torch.equal(got, want)), "compiling": list(seen),
                      "breaks": {k.splitlines()[0]: v for k, v in counters["graph_break"].items()}}
        seen.clear()
        torch._dynamo.reset()
        try:
            torch.compile(f, backend="eager", fullgraph=True)(x, g)
            runs[name]["fullgraph"] = "ran"
        except Exception as exc:
            runs[name]["fullgraph"] = type(exc).__name__ + ": " + str(exc).splitlines()[0]
        seen.clear()
    out["runs"] = runs
    print(json.dumps(out))
"""


def test_lazy_disable_matches_torch_compiler_disable_and_import_skips_dynamo(tmp_path):
    script = tmp_path / "eager_only_check.py"
    script.write_text(textwrap.dedent(SCRIPT))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["dynamo_after_import"] is False
    assert out["dynamo_after_decorating"] is False
    for run in out["runs"].values():  # dynamo words the two skips differently
        assert run["equal"] and run["compiling"] == [False], out  # ran once, eagerly
        assert sum(run["breaks"].values()) == 1, out  # one graph break, at the call
        assert all("torch.compiler.disable()" in b for b in run["breaks"]), out
        assert run["fullgraph"].startswith("Unsupported: Skip"), out
