"""The serving path imports and runs with torch unavailable (design principle 2)."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

BLOCK_TORCH = textwrap.dedent("""
    import sys
    class BlockTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in the serving path")
    sys.meta_path.insert(0, BlockTorch())
""")


def test_services_import_and_generate_without_torch(repository):
    script = BLOCK_TORCH + textwrap.dedent(f"""
        import asyncio, importlib, pkgutil
        import services
        for mod in pkgutil.walk_packages(services.__path__, "services."):
            importlib.import_module(mod.name)
        from services.pipelines.pipeline_gan import GANPipeline
        from services.runtime.onnxruntime_backend import OnnxRuntimeBackend
        from services.runtime.repository import ModelRepository
        backend = OnnxRuntimeBackend(ModelRepository({str(repository)!r}))
        out = asyncio.run(GANPipeline(backend, "cgan_digits")(seed=1, num_images=2, class_label=4))
        assert out.images.shape == (2, 1, 32, 32)
        assert "torch" not in sys.modules
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")
