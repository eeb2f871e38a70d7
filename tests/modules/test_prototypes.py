"""The one prototype loop: easyfsl's process_support_set / forward, used by ProtoNet and predict."""

from __future__ import annotations

import pytest
import torch

from tl_lightning.modules.prototypes import PrototypeClassifier


def test_two_classes_in_two_dimensions_by_hand():
    # class 5: (0, 0), (2, 0) -> prototype (1, 0); class 2: (0, 4), (0, 2) -> prototype (0, 3)
    support = torch.tensor([[0.0, 0.0], [0.0, 4.0], [2.0, 0.0], [0.0, 2.0]])
    labels = torch.tensor([5, 2, 5, 2])
    clf = PrototypeClassifier(torch.nn.Identity())
    clf.process_support_set(support, labels)
    assert clf.classes.tolist() == [2, 5]  # logit columns: sorted class ids
    assert clf.prototypes.tolist() == [[0.0, 3.0], [1.0, 0.0]]
    queries = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    # (1,1): to (0,3) 1 + 4 = 5, to (1,0) 0 + 1 = 1;  (0,3): to (0,3) 0, to (1,0) 1 + 9 = 10
    assert clf(queries).tolist() == [[-5.0, -1.0], [0.0, -10.0]]


def test_support_is_embedded_in_batches_with_the_same_prototypes():
    net = torch.nn.Linear(3, 2)
    support, labels = torch.randn(10, 3), torch.tensor([0, 1] * 5)
    one, many = PrototypeClassifier(net, batch_size=64), PrototypeClassifier(net, batch_size=3)
    one.process_support_set(support, labels)
    many.process_support_set(support, labels)
    torch.testing.assert_close(one.prototypes, many.prototypes)


def test_forward_before_the_support_is_an_error():
    with pytest.raises(RuntimeError, match="process_support_set"):
        PrototypeClassifier(torch.nn.Identity())(torch.zeros(1, 2))
