"""tools/policy_attribution.py: the rows of a batch that pass the parting node, where the policy loss is split."""

from __future__ import annotations

import importlib.util

import torch

from conftest import REPO

_spec = importlib.util.spec_from_file_location("_tool_policy_attribution", REPO / "tools" / "policy_attribution.py")
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)


def test_the_attribution_tool_finds_the_rows_that_pass_a_node():
    prompt_ids = torch.tensor([[0, 7, 8], [0, 7, 8], [7, 8, 9], [0, 7, 8]])
    prompt_mask = torch.tensor([[0, 1, 1], [0, 1, 1], [1, 1, 1], [0, 1, 1]])
    action_ids = torch.tensor([[1, 2, 3, 0], [1, 2, 4, 5], [1, 2, 3, 0], [1, 2, 0, 0]])
    action_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]])
    got = tool.node_mask(prompt_ids, prompt_mask, action_ids, action_mask, prompt=[7, 8], prefix=[1, 2])
    # rows 0 and 1 pass (prompt [7, 8], action 1 2 ...); row 2 has another prompt; row 3 ends at the node
    assert got.tolist() == [[False, False, True, False], [False, False, True, False],
                            [False, False, False, False], [False, False, False, False]]
