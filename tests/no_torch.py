"""Run Python in a subprocess where torch (and the rest of the export stack) cannot be imported, and check at
the end that none of it got in: proves a runtime path is torch-free. Used by the CLI and runtime tests."""

import os
import subprocess
import sys
import textwrap

BLOCK = textwrap.dedent("""
    import sys
    BLOCKED = {"torch", "torchvision", "transformers", "diffusers", "onnx", "onnxscript", "safetensors"}

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")

    sys.meta_path.insert(0, Block())
    try:
        import torch
    except ImportError:
        pass
    else:
        raise SystemExit("the import hook failed")

    def check_no_torch():
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not leaked, leaked
""")
CLI = BLOCK + textwrap.dedent("""
    from osx.cli import main
    try:
        main(sys.argv[1:])
    finally:
        check_no_torch()
""")


def run_without_torch(script: str, *args) -> subprocess.CompletedProcess:
    """`script` (after BLOCK: it may call check_no_torch()) with `args` in sys.argv[1:]."""
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": ""})
