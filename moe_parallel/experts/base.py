"""The declared interface of the routed experts: ``RoutedExperts`` and its ``ExpertsOutput``.

    out = experts(rows, group_sizes)
    out.y[i] = expert_{l(i)}(rows[i])                                     [N, H]
``rows`` [N, H] are grouped by local expert (``group_sizes`` [E_local] CPU int64 rows each,
``Σ group_sizes = N``, padding rows included), ``l(i)`` the local expert of row ``i``. An
implementation that pads the rows internally (block-sparse) reports the padded row count in
``out.padded_rows`` (None: it pads nothing), which the routing statistics read.

An implementation with ``takes_row_weights = True`` also takes ``forward(rows, group_sizes,
row_weights)``, ``row_weights [N]`` float (or None: all 1), and returns
    out.y[i] = row_weights[i] · expert_{l(i)}(rows[i])
applying the weight inside the expert (before its second GEMM); the layer then sends it the
routing weights and combines the rows with an unweighted sum, which keeps no expert output rows
for the backward (``dispatch.pipeline``). The gradient reaches ``row_weights``.
"""

from __future__ import annotations

import abc
from typing import NamedTuple, Optional

from torch import Tensor, nn


class ExpertsOutput(NamedTuple):
    """What ``RoutedExperts.forward`` returns."""

    y: Tensor                   # [N, H] every row's expert output
    padded_rows: Optional[int]  # rows after the implementation's own padding; None: no padding


class RoutedExperts(nn.Module, abc.ABC):
    """``num_local_experts`` expert FFNs applied to rows grouped by expert (module docstring).

    Subclasses declare their parameters and implement ``forward``; ``MoELayer`` tags every
    parameter of this module as expert-parallel (synced over the expert-data-parallel group).
    """

    num_local_experts: int
    takes_row_weights: bool = False  # forward takes row_weights (module docstring)

    @abc.abstractmethod
    def forward(self, rows: Tensor, group_sizes: Tensor) -> ExpertsOutput:
        """``ExpertsOutput(y [N, H], padded_rows)`` for ``rows`` [N, H] grouped by local expert,
        ``group_sizes`` [E_local] CPU int64 summing to ``N``."""
