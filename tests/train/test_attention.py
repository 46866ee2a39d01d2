"""Packed attention at micro-batch > 1: every token's loss is the loss of its document run alone, per kernel.

A micro-batch of three packed rows (documents of 20+12, 7+9+16 and 32 tokens, the first row with a
padding segment of 4 that restarts at 0 like pack's) goes through the decoder with each kernel's
inputs (``attention.model_inputs``); each document then runs alone through the plain model. sdpa,
eager and varlen (the flattened micro-batch; on CPU its per-document SDPA reference kernel) are
checked forward and backward: the gradient of the packed loss equals the sum of the documents'
gradients, so nothing leaks across a boundary either way. FlexAttention is checked forward only:
torch 2.13 runs it on CPU (compiled, as transformers calls it) but has no CPU backward.
"""

import pytest
import torch
import torch.nn.functional as F

from cptflow.model import modeling
from cptflow.train import attention
from cptflow.train.loss import CausalLMLoss, shift_targets
from support.training import V, make_model

T = 32
DOCS = [[20, 8, 4], [7, 9, 16], [32]]  # lengths per row; row 0 ends in a padding segment of 4
ATOL = 2e-5  # fp32, 2 layers: packed vs alone differ by kernel rounding only (measured max 1e-6)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("attn") / "model")


def packed_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (len(DOCS), T), generator=g)
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in DOCS])
    labels = ids.clone()
    labels[0, 28:] = modeling.IGNORE_INDEX  # the padding segment: no loss
    return ids, pos, labels


def spans():
    for b, row in enumerate(DOCS):
        a = 0
        for n in row:
            yield b, a, a + n
            a += n


def load(model_dir, kernel):
    attention.register()
    return modeling.load_model(model_dir, attention.HF_IMPL[kernel])


def per_token_packed(model, kernel, ids, pos, labels):
    """[B, T] losses with the kernel's packed inputs (targets shifted per row, as CausalLMLoss does)."""
    hidden = model.get_decoder()(**attention.model_inputs(kernel, ids, pos), use_cache=False).last_hidden_state
    logits = model.lm_head(hidden).reshape(len(DOCS), T, -1)
    return F.cross_entropy(logits.transpose(1, 2), shift_targets(labels), reduction="none")


def per_token_alone(model, ids, labels):
    """The same [B, T] losses, each document run by itself through the plain model (no packing at all)."""
    out = torch.zeros(len(DOCS), T)
    targets = shift_targets(labels)
    for b, a, e in spans():
        logits = model(input_ids=ids[b:b + 1, a:e], use_cache=False).logits[0]
        out[b, a:e] = F.cross_entropy(logits, targets[b, a:e], reduction="none")
    return out


def test_transformers_523_builds_packed_masks_from_position_ids_at_batch_2(model_dir):
    """What transformers itself does (the module docstring's claim): sdpa masks by position ids at batch > 1."""
    model = load(model_dir, "sdpa").eval()
    ids, pos, labels = packed_batch()
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        alone = model(input_ids=ids[1:2, 7:16], use_cache=False).logits
    torch.testing.assert_close(logits[1:2, 7:16], alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kernel", ["sdpa", "eager", "varlen"])
def test_every_token_loss_equals_its_document_alone(model_dir, kernel):
    model = load(model_dir, kernel)
    ref = load(model_dir, "sdpa")
    ids, pos, labels = packed_batch()
    packed = per_token_packed(model, kernel, ids, pos, labels)
    alone = per_token_alone(ref, ids, labels)
    torch.testing.assert_close(packed, alone, atol=ATOL, rtol=0)
    # Backward: d(packed loss) = sum over documents of d(document loss); the summed loss of CausalLMLoss too.
    loss = CausalLMLoss(model, kernel, chunk_tokens=16)(ids, pos, labels)
    loss.backward()
    per_token_alone(ref, ids, labels).sum().backward()
    torch.testing.assert_close(loss, alone.sum(), atol=1e-4, rtol=0)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_flex_attention_forward_on_cpu_matches_documents_alone(model_dir):
    model = load(model_dir, "flex").eval()
    ref = load(model_dir, "sdpa").eval()
    ids, pos, labels = packed_batch()
    with torch.no_grad():
        packed = per_token_packed(model, "flex", ids, pos, labels)
        alone = per_token_alone(ref, ids, labels)
    torch.testing.assert_close(packed, alone, atol=ATOL, rtol=0)
    with pytest.raises(NotImplementedError, match="backward on CPU"):  # why flex is refused for CPU training
        per_token_packed(load(model_dir, "flex"), "flex", ids, pos, labels).sum().backward()


def test_masks_and_cu_seqlens():
    pos = torch.tensor([[0, 1, 2, 0, 1], [3, 4, 0, 1, 0]])  # row 1 starts mid-document: still its own document
    doc = attention.document_ids(pos)
    m = attention.block_causal_mask(doc)[:, 0]
    assert m[0].tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    assert m[1, 1].tolist() == [1, 1, 0, 0, 0] and m[1, 4].tolist() == [0, 0, 0, 0, 1]
    cu = attention.cu_seqlens(pos)
    assert cu.tolist() == [0, 3, 5, 7, 9, 10] and cu.dtype == torch.int32
    flat = attention.model_inputs("varlen", torch.zeros(2, 5, dtype=torch.long), pos)
    assert flat["input_ids"].shape == (1, 10) and flat["position_ids"].tolist() == [pos.flatten().tolist()]
    assert flat["max_length_q"] == 5  # the row length: one value for every batch, so compile never recompiles


def test_kernel_choice_on_cpu_and_refusals():
    cpu = torch.device("cpu")
    assert attention.resolve_kernel("auto", cpu, "bf16") == "sdpa"
    assert attention.resolve_kernel("varlen", cpu, "fp32") == "varlen"  # the CPU reference kernel
    with pytest.raises(ValueError, match="flex trains on CUDA only"):
        attention.resolve_kernel("flex", cpu, "bf16")
    with pytest.raises(ValueError, match="unknown value"):
        attention.resolve_kernel("flash_attention_2", cpu, "bf16")

    class Cfg:
        sliding_window = 16

    with pytest.raises(ValueError, match="sliding_window 16 < sample length 32"):
        attention.check_model(Cfg(), 32)
    attention.check_model(Cfg(), 16)
