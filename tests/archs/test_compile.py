"""A whole language-model training step under torch.compile(fullgraph=True): every mixer, on the
reference backend, on the fused kernels (Triton's interpreter here) and on the C++ CPU kernels, traces
without a graph break, and its loss and gradients equal the eager step's."""

import pytest
import torch
import torch.nn.functional as F

from seqmix.archs import MIXERS
from seqmix.archs.lm import LanguageModel, LMConfig
from tests.helpers import DEVICE, rel_err, require_cpu_kernels

# Tracing and compiling a whole LM step per backend takes minutes; the quick tier leaves it to CI.
pytestmark = pytest.mark.slow

# The decompositions and partitioner of inductor, run eagerly: what the CPU can check of a compiled
# graph (inductor's own code generation is checked on the GPU: benchmarks/gpu_check.sh).
COMPILER = "aot_eager_decomp_partition"
FUSED_MIXERS = sorted(set(MIXERS) - {"attention"})
# The hourglass traces without a host sync only with max_segments (docs/design.md, "Dynamic token pooling");
# gumbel is its mode with a boundary gradient (hnet sizes its chunks from the data: a sync). The recurrent
# depth unrolls r iterations into the graph: a small r, with one iteration under no_grad.
MIXER_OPTIONS = {
    "hourglass": {"boundary": "gumbel", "max_segments": 8, "layers": ["attention"]},
    "recurrent_depth": {"core": ["attention"], "mean_steps": 3, "backprop_steps": 2},
}


def _loss(model, tokens):
    logits, _ = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


def _gradients(model, loss_fn, tokens):
    model.zero_grad()
    torch.manual_seed(1)  # the same noise (gumbel boundaries, the start latent) in the eager and compiled steps
    loss = loss_fn(model, tokens)
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("backend, layers",
                         [("reference", sorted(MIXERS)), ("triton", FUSED_MIXERS), ("cpu", sorted(MIXERS))])
def test_training_step_compiles_in_one_graph(backend, layers, monkeypatch):
    if backend == "cpu":
        require_cpu_kernels()
    device = torch.device("cpu") if backend == "cpu" else DEVICE  # the C++ kernels take CPU tensors
    monkeypatch.setenv("SEQMIX_BACKEND", backend)
    torch.manual_seed(0)
    options = {name: MIXER_OPTIONS[name] for name in layers if name in MIXER_OPTIONS}
    model = LanguageModel(LMConfig(hidden_size=32, num_heads=2, layers=layers, mixer_options=options)).to(device)
    tokens = torch.randint(0, 256, (2, 25), device=device)
    eager_loss, eager_grads = _gradients(model, _loss, tokens)
    torch._dynamo.reset()
    loss, grads = _gradients(model, torch.compile(_loss, fullgraph=True, backend=COMPILER), tokens)
    assert rel_err(loss, eager_loss) < 1e-6
    # One relative error over all gradients: a single tiny one (Mamba's D, ~1e-5) is mostly rounding.
    assert rel_err(grads, eager_grads) < 1e-5
