"""jest-curate: JEST (joint example selection) as an offline Apache Beam pipeline.

Dataflow ships this package to workers with `--setup_file ./setup.py`.
"""
import setuptools

setuptools.setup(
    name="jest-curate",
    version="0.1.0",
    description="Joint example selection (JEST) for contrastive image-text pretraining, on Apache Beam",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["jest_core", "jest_core.*", "jest_curate",
                                               "jest_curate.*", "pipelines", "pipelines.*",
                                               "training", "training.*", "benchmarks"]),
    package_data={"training": ["model_configs/*.json"], "jest_curate": ["configs/*.json"]},
    install_requires=[
        # Not apache-beam[torch]: that extra pins an old torch.
        "apache-beam[gcp]>=2.60",
        # torch and torchvision are resolved together (their builds must match).
        "torch>=2.3",
        "torchvision>=0.18",
        "open_clip_torch>=2.26",
        "pyarrow>=14",
        "fsspec>=2024.2",
        "gcsfs>=2024.2",
        "numpy>=1.24",
        "pillow>=10",
        # open_clip_train pins webdataset<=0.2.86; keep a range both can share.
        "webdataset>=0.2.48",
        "matplotlib>=3.7",
        "tensorboard>=2.14",
    ],
    extras_require={
        "dev": [
            "pytest>=7",
            "packaging>=23",  # tests/test_setup.py reads the lock against these ranges.
            "pytest-xdist>=3",
            "open_clip_torch[training]>=2.26",  # Tests load our shards with open_clip_train.
            "webdataset>=0.2.48,<=0.2.86",
            "gcp-storage-emulator>=2024.1",
        ],
    },
    entry_points={"console_scripts": ["jest-curate = jest_curate.cli:main"]},
)
