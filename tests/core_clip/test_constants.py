"""core_clip.constants: constant tensors made once per device and dtype, safe for autograd and torch.compile."""
import torch

from core_clip.constants import constant
from core_clip.preprocess import OPENAI_MEAN, OPENAI_STD, Preprocess
from tests.helpers import HostSyncs


def test_constant_is_made_once_per_device_and_dtype():
    first = constant(((0, 1), (2, 3.5)), "cpu", torch.float64)
    assert torch.equal(first, torch.tensor([[0.0, 1.0], [2.0, 3.5]], dtype=torch.float64))
    assert constant(((0, 1), (2, 3.5)), torch.device("cpu"), torch.float64) is first
    other = constant(((0, 1), (2, 3.5)), "cpu", torch.float32)
    assert other is not first and other.dtype == torch.float32


def test_a_first_call_in_inference_mode_still_serves_autograd():
    with torch.inference_mode():
        made = constant((1.5, 2.5, 4.0), "cpu", torch.float16)
    assert not made.is_inference()
    x = torch.ones(3, dtype=torch.float16, requires_grad=True)
    (x / made).sum().backward()   # division saves the constant for the backward pass
    assert torch.equal(x.grad, 1 / made)


def test_preprocess_normalize_makes_no_host_data_after_its_first_call():
    pre = Preprocess(size=8)
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = (x - torch.tensor(OPENAI_MEAN, dtype=x.dtype).view(1, 3, 1, 1)) / torch.tensor(
        OPENAI_STD, dtype=x.dtype).view(1, 3, 1, 1)
    pre.normalize(x)
    with HostSyncs() as syncs:
        out = pre.normalize(x)
    assert syncs.sites == []
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_compiled_code_makes_its_own_constants_and_so_does_not_recompile_when_the_cache_fills():
    pre = Preprocess(size=8, mean=(0.25, 0.5, 0.75), std=(0.5, 0.25, 0.125))   # in no other test: not cached yet
    compiled = torch.compile(pre.normalize, backend="eager", dynamic=False)
    y = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    first = compiled(y)
    torch.testing.assert_close(compiled(y), pre.normalize(y))   # the eager call fills the cache
    torch.testing.assert_close(compiled(y), first)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1
