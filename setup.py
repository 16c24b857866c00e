"""Installs cctview-beam: CCTV frames in object storage -> cross-camera vehicle matches."""
from setuptools import setup

# Optional backends (README.md, "Models and weights"). The core install stays free of
# TensorFlow; the test extra includes both so the test command exercises them.
# Beam's TensorFlow handler imports tensorflow_hub, which imports pkg_resources (gone
# from setuptools 81 on); ImageAI 3 imports cv2 but declares no requirements at all.
TF = ["tensorflow>=2.15", "tensorflow-hub>=0.16", "setuptools<81"]
IMAGEAI = ["imageai>=3.0,<4", "opencv-python-headless>=4.8"]
DASK = ["dask>=2024.1", "distributed>=2024.1"]

setup(
    name="cctview-beam",
    version="0.1.0",
    description=(
        "Apache Beam pipeline that turns archived CCTV frames into cross-camera "
        "vehicle match pairs (Parquet), locally or on Dataflow."
    ),
    python_requires=">=3.10",
    packages=["pipelines", "transforms", "models", "runners"],
    install_requires=[
        "apache-beam[gcp,aws]>=2.60",
        "google-cloud-storage>=2.10",
        "torch>=2.4",
        "torchvision>=0.19",
        "numpy>=1.26",
        "pyarrow>=14",
        "pillow>=10",
        "onnxruntime>=1.17",
        "scipy>=1.11",
        "tzdata",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "hypothesis>=6.100",
            "gcp-storage-emulator>=2024.8",
            "moto[server]>=5",
            "boto3>=1.34",
            # drives the Debian chromium + chromium-driver that .ci/run installs
            # (tests/test_report.py: the report in a headless browser)
            "selenium>=4.20",
            *TF,
            *IMAGEAI,
            *DASK,
        ],
        "tf": TF,
        "imageai": IMAGEAI,
        # A dask.distributed cluster through runners/dask_runner.py (runners/README.md).
        "dask": DASK,
    },
    entry_points={"console_scripts": ["cctview=pipelines.cli:main"]},
)
