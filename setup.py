"""Package metadata for inductor_flex.

The Inductor lowering lives in ``lowering/`` and the Triton templates in ``templates/``
at the top of the repository (docs/internals.md maps the rooms); here they are mapped into the
``inductor_flex`` namespace so that an installed copy is one importable package.
"""
from setuptools import setup

setup(
    name="inductor_flex",
    version="0.1.0",
    description="FlexAttention as a torch.compile Inductor plugin: fused, block-sparse, autotuned",
    python_requires=">=3.10",
    packages=[
        "inductor_flex",
        "inductor_flex.ops",
        "inductor_flex.masks",
        "inductor_flex.integrations",
        "inductor_flex.lowering",
        "inductor_flex.templates",
    ],
    package_dir={
        "inductor_flex": "inductor_flex",
        "inductor_flex.lowering": "lowering",
        "inductor_flex.templates": "templates",
    },
    package_data={"inductor_flex.templates": ["*.py.jinja"]},
    install_requires=["torch>=2.11", "jinja2", "sympy"],
    extras_require={
        # 5.17 passes the mask builder (q_length, q_offset), as register() needs (5.0 passed
        # cache_position); tested with 5.24
        "transformers": ["transformers>=5.17"],
        "pictures": ["matplotlib"],  # inductor_flex.visualize, the bench command's --plot
        # transformers and matplotlib so that CI runs their tests (skipped without them)
        "test": ["pytest", "expecttest", "hypothesis", "numpy", "matplotlib", "transformers>=5.17"],
        # Triton for a CPU-only machine, so that the tests run our Triton kernels through its
        # interpreter (tests/test_interpreter.py; 3.6, whose internals triton_interpreter.py
        # patches). Not on a GPU machine: its torch brings the Triton it needs.
        "interpreter": ["triton==3.6.0; platform_system == 'Linux' and platform_machine == 'x86_64'"],
    },
    entry_points={
        "torch_dynamo_backends": ["inductor_flex = inductor_flex.backend:inductor_flex_backend"],
        "console_scripts": ["inductor-flex-bench = inductor_flex.bench:main"],
    },
)
