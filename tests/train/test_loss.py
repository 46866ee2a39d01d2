"""The chunked linear cross-entropy equals the plain one (fp32, within 1e-6), gradients too, at any chunk size.

The plain loss is what transformers computes: logits = lm_head(hidden) for all tokens at once, then
cross-entropy; ``linear_cross_entropy`` never holds more than one chunk's logits (peak memory:
bench/gpu.py, "loss memory"). Compared as means over the target tokens, the scale the optimizer
sees; gradients within 1e-6 absolute of the plain ones (their entries are ~1e-2).
"""

import pytest
import torch
import torch.nn.functional as F

from cptflow.model import modeling
from cptflow.train.loss import CausalLMLoss, linear_cross_entropy, shift_targets
from support.training import V, make_model


def plain(hidden, weight, targets):
    return F.cross_entropy(hidden @ weight.t(), targets, ignore_index=modeling.IGNORE_INDEX, reduction="sum")


def case(n=300, h=32, v=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = (0.1 * torch.randn(v, h, generator=g)).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::7] = modeling.IGNORE_INDEX
    return hidden, weight, targets


@pytest.mark.parametrize("chunk", [1, 7, 64, 300, 4096])
def test_chunked_loss_and_gradients_equal_the_plain_loss(chunk):
    hidden, weight, targets = case()
    n = int((targets != modeling.IGNORE_INDEX).sum())
    ref = plain(hidden, weight, targets) / n
    gh, gw = torch.autograd.grad(ref, (hidden, weight))
    out = linear_cross_entropy(hidden, weight, targets, chunk) / n
    ch, cw = torch.autograd.grad(out, (hidden, weight))
    assert out.dtype == torch.float32
    assert abs(out.item() - ref.item()) < 1e-6
    assert (ch - gh).abs().max() < 1e-6 and (cw - gw).abs().max() < 1e-6
    assert gw.abs().max() > 1e-3  # the gradients compared are not all tiny


def test_gradient_scales_with_the_incoming_gradient_and_frozen_inputs_get_none():
    hidden, weight, targets = case(n=50)
    (g1,) = torch.autograd.grad(linear_cross_entropy(hidden, weight, targets, 16), (hidden,))
    out = linear_cross_entropy(hidden, weight, targets, 16)
    (g3,) = torch.autograd.grad(3.0 * out, (hidden,), retain_graph=True)
    torch.testing.assert_close(g3, 3 * g1)
    with pytest.raises(RuntimeError, match="second backward"):  # the stored gradients were handed over
        torch.autograd.grad(out, (hidden,))
    frozen = weight.detach()  # embeddings_only with a frozen head, or eval: no weight gradient is computed
    out = linear_cross_entropy(hidden, frozen, targets, 16)
    out.backward()
    assert hidden.grad is not None and frozen.grad is None


def test_all_padding_gives_zero_loss_and_zero_gradients():
    hidden, weight, _ = case(n=20)
    targets = torch.full((20,), modeling.IGNORE_INDEX)
    out = linear_cross_entropy(hidden, weight, targets, 8)
    out.backward()
    assert out.item() == 0 and not hidden.grad.any() and not weight.grad.any()


def test_bf16_autocast_runs_the_matmuls_in_bf16_and_stays_close():
    hidden, weight, targets = case()
    ref = plain(hidden, weight, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_cross_entropy(hidden, weight, targets, 64)
    out.backward()
    assert out.dtype == torch.float32 and weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.float32
    assert out.item() == pytest.approx(ref.item(), rel=1e-2)  # bf16 logits: ~3 significant digits
    assert out.item() != ref.item()


def test_causal_lm_loss_equals_the_hugging_face_loss(tmp_path):
    model = modeling.load_model(make_model(tmp_path / "m"), "sdpa")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2, 32), generator=g)
    labels = ids.clone()
    labels[1, 25:] = modeling.IGNORE_INDEX
    pos = torch.arange(32).expand(2, 32)  # one document per row: what the HF forward assumes
    n = int((shift_targets(labels) != modeling.IGNORE_INDEX).sum())
    hf = model(input_ids=ids, labels=labels, use_cache=False).loss  # mean over targets, logits materialised
    ours = CausalLMLoss(model, "sdpa", chunk_tokens=10)(ids, pos, labels) / n
    assert abs(ours.item() - hf.item()) < 1e-6
