"""Run the Triton kernels of tests/kernels on the CPU through Triton's interpreter.

``TRITON_INTERPRET`` is read when a ``@triton.jit`` function is decorated, so it must be set
before ``gsnet_deploy.kernels.triton_cost_volume`` is first imported; pytest imports this
conftest before the test modules of this folder.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
