"""driffusion_rt: a rank-per-GPU runtime for DRiffusion draft-and-refine parallel diffusion sampling.

GPU users: `pip install .` (ranges below). CPU dev/CI: `pip install -r requirements-cpu.txt -e .[test]`.
The lower bounds of torch, triton and diffusers are the releases the distributed tests and the GPU proof's CPU dry
run passed on (docs/compatibility.md records the run); the GPU machines run torch 2.11 with triton 3.6.
The top-level `kernels/` folder installs as `driffusion_rt.kernels`, never as a package named `kernels`.
"""
from setuptools import setup

setup(
    name="driffusion_rt",
    version="0.1.0",
    description="Draft-and-refine parallel diffusion sampling runtime (torchrun, NCCL/gloo, Triton)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["driffusion_rt", "driffusion_rt.pipelines", "driffusion_rt.kernels"],
    package_dir={"driffusion_rt": "driffusion_rt", "driffusion_rt.kernels": "kernels"},
    package_data={"driffusion_rt": ["assets/*/*"]},
    install_requires=[
        "torch>=2.11",
        "diffusers>=0.42.1",
        "transformers>=4.45",
        "safetensors>=0.4",
        "numpy>=1.24",
        "pillow>=10",
        "tqdm>=4.60",
        "triton>=3.6; platform_system == 'Linux'",
        "nvidia-ml-py>=12.535",
    ],
    extras_require={
        "serve": ["starlette>=0.37", "uvicorn>=0.29", "prometheus_client>=0.20"],
        # video pipelines: Wan's transformer needs accelerate to load, Wan's prompt cleaning ftfy; MP4 output
        "video": ["accelerate>=0.30", "ftfy>=6.1", "imageio>=2.31", "imageio-ffmpeg>=0.4.9"],
        "test": ["pytest>=8", "scikit-learn>=1.3", "scipy>=1.10", "sentencepiece>=0.2", "protobuf>=4",
                 "starlette>=0.37", "uvicorn>=0.29", "prometheus_client>=0.20", "matplotlib>=3.7", "accelerate>=0.30",
                 "ftfy>=6.1", "imageio>=2.31", "imageio-ffmpeg>=0.4.9", "peft>=0.17", "openai>=1.0"],
        "lora": ["peft>=0.17"],
        "perf": ["matplotlib>=3.7", "scikit-learn>=1.3", "scipy>=1.10"],
    },
    entry_points={"console_scripts": ["driffusion-generate=driffusion_rt.generate:main",
                                      "driffusion-serve=driffusion_rt.serve:main"]},
)
