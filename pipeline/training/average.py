"""Average the weights of several checkpoints of one network: a uniform "model soup".

Checkpoints of one run, or of runs each started from another's weights, lie in one basin of the
loss, and the mean of their weights tends to generalise a little better than any one of them
(Izmailov et al. 2018, "Averaging Weights Leads to Wider Optima"; Wortsman et al. 2022, "Model
soups"). The average is written in float16 like the trainers' exports, with a card that names
every member by path and sha256 and keeps the member's own card.

    python -m jobs.average_checkpoints --out soup.pt stage4/best.pt stage4/last.pt cpu5/last.pt
"""

from __future__ import annotations

import json

import torch

from pipeline.models import read_checkpoint
from pipeline.models.checkpoints import Checkpoint, CheckpointError, mismatch
from pipeline.training import trainer


def average(checkpoints: list[Checkpoint]) -> dict[str, torch.Tensor]:
    """The element-wise mean of float tensors; other tensors must agree across members.

    Raises:
        CheckpointError: the members do not hold the same keys and shapes.
    """
    if len(checkpoints) < 2:
        raise CheckpointError("averaging needs at least two checkpoints")
    first = checkpoints[0]
    for other in checkpoints[1:]:
        problems = mismatch(first.state_dict, other.state_dict, other.uri, first.uri)
        if problems:
            raise CheckpointError(f"{first.uri} and {other.uri} are not the same network: "
                                  + "; ".join(problems))
    mean = {}
    for key, tensor in first.state_dict.items():
        if tensor.is_floating_point():
            stacked = torch.stack([c.state_dict[key].double() for c in checkpoints])
            mean[key] = stacked.mean(0).float()
        elif all(torch.equal(tensor, c.state_dict[key]) for c in checkpoints):
            mean[key] = tensor
        else:
            raise CheckpointError(f"{key} is not a float tensor and differs between members")
    return mean


def average_into(uris: list[str], out: str) -> int:
    """Write the mean of the checkpoints at ``uris`` to ``out``, with a card naming each member;
    returns how many were averaged."""
    members = [read_checkpoint(uri) for uri in uris]
    card = {"trainer": "jobs.average_checkpoints", "average_of": [
        {"uri": c.uri, "sha256": c.sha256,
         "model_card": json.loads(c.meta["model_card"]) if "model_card" in c.meta else None}
        for c in members]}
    trainer.export_state_dict(average(members), out, card)
    return len(members)
