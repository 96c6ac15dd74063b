"""The README's usage example runs as written."""

import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs():
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    layer, base = namespace["layer"], namespace["base"]
    assert layer.merged and namespace["y"].shape == (4, 1024)
    # lambda_b starts at zero, so merging the fresh adapter leaves the weight's forward unchanged
    x = torch.randn(3, 1024)
    torch.testing.assert_close(layer(x), base(x))
