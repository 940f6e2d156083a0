"""Packed, padding-free rows keep dialogues apart: each dialogue's logits are those of the dialogue run alone."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from utils.assets import ensure_tiny_model


@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
def test_nothing_leaks_across_packed_dialogues(attn):
    model = AutoModelForCausalLM.from_pretrained(ensure_tiny_model(), dtype=torch.float32, attn_implementation=attn)
    model.eval()
    g = torch.Generator().manual_seed(0)
    dialogues = [torch.randint(3, 32000, (1, n), generator=g) for n in (20, 15, 9)]
    packed = torch.cat(dialogues, dim=1)
    positions = torch.cat([torch.arange(d.shape[1]) for d in dialogues]).unsqueeze(0)  # restart at every dialogue
    with torch.no_grad():
        # use_cache=False, as TRL's SFTTrainer.compute_loss passes it: the mask is then built from the positions
        logits = model(input_ids=packed, position_ids=positions, use_cache=False).logits
        start = 0
        for dialogue in dialogues:
            alone = model(input_ids=dialogue, use_cache=False).logits
            n = dialogue.shape[1]
            # the pretrained tiny model's logits reach ~20: 1e-4 is float32 summation order, a leak is O(1)
            assert torch.allclose(logits[:, start : start + n], alone, atol=1e-4), (attn, start)
            start += n
