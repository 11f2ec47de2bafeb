import torch

from clipguide import Perceptor, guide
from clipguide.generators import GENERATORS

PROMPT = "a red circle on a blue background"


def test_compiled_perceptor_matches_eager_embeddings_and_gradients():
    eager, fast = Perceptor("shapes", device="cpu"), Perceptor("shapes", device="cpu", compile=True)
    views = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    results = []
    for perceptor in (eager, fast):
        x = views.clone().requires_grad_(True)
        emb = perceptor.encode_views(0, x)
        grad, = torch.autograd.grad(emb[:, :8].sum(), x)
        results.append((emb.detach(), grad))
    torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-5)


def test_guide_compiled_makes_the_same_picture():
    runs = [guide(PROMPT, backend="pixels", steps=4, seed=1, device="cpu", compile=c) for c in (False, True)]
    torch.testing.assert_close(runs[1].tensor, runs[0].tensor, rtol=0, atol=2e-3)
    assert abs(runs[1].losses[-1]["total"] - runs[0].losses[-1]["total"]) < 1e-3


def test_compile_decode_twice_wraps_once():
    generator = GENERATORS.get("pixels")(1, 32, 32, generator=torch.Generator().manual_seed(0))
    eager = generator.decode()
    generator.compile_decode()
    once = generator.decode
    generator.compile_decode()
    assert generator.decode is once
    torch.testing.assert_close(generator.decode(), eager)


def test_compiled_palette_decode_follows_the_annealed_choice_without_recompiling():
    # other tests compiled Pixels.decode for other modes and sizes: a cache entry per code object
    torch._dynamo.reset()
    generator = GENERATORS.get("pixels")(2, 32, 32, generator=torch.Generator().manual_seed(0), colors=2,
                                         palette="shapes", resolution=8)
    generator.compile_decode()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for progress in (0.0, 0.5, 1.0):
            generator.anneal(progress)
            compiled = generator.decode()
            torch.testing.assert_close(compiled, type(generator).decode(generator))   # the eager method, same state
    # the choice really sharpened between the calls: the last blend differs from the first one
    generator.anneal(0.0)
    assert not torch.allclose(generator.decode(), compiled, atol=1e-3)
