"""megatron-core's column/row tensor-parallel linears, with the bias inside the matrix product on one TP rank.

megatron-core adds a linear's bias apart from its matmul (inside the linear, or handed on to the
bias-dropout-add and the MLP's activation): one more pass over the output per linear in forward and in
backward. With one tensor-parallel rank and no sequence parallelism there is nothing to split or reduce, so
`F.linear` takes the bias into the GEMM (one `addmm`), as a plain PyTorch model does. Same parameters, names
and state dicts; with TP > 1 or sequence parallelism megatron-core's own path runs unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear


class _BiasInMatmul:
    """Mixin over a megatron-core parallel linear: on one TP rank, (F.linear(x, W, b), None)."""

    _one_rank: bool | None = None

    def _bias_in_matmul(self) -> bool:
        if self._one_rank is None:
            cfg = self.config
            self._one_rank = (
                self.bias is not None
                and (self.tp_group is None or dist.get_world_size(self.tp_group) == 1)
                and not cfg.sequence_parallel
                and not cfg.defer_embedding_wgrad_compute
                and not cfg.gradient_accumulation_fusion
                and cfg._cpu_offloading_context is None
                and not getattr(self, "explicit_expert_comm", False)
            )
        return self._one_rank


class FusedBiasColumnParallelLinear(_BiasInMatmul, ColumnParallelLinear):
    def forward(self, input_: torch.Tensor, weight: torch.Tensor | None = None,
                runtime_gather_output: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if weight is None and self._bias_in_matmul():
            return torch.nn.functional.linear(input_, self.weight, self.bias), None
        return super().forward(input_, weight, runtime_gather_output)


class FusedBiasRowParallelLinear(_BiasInMatmul, RowParallelLinear):
    def forward(self, input_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._bias_in_matmul():
            return torch.nn.functional.linear(input_, self.weight, self.bias), None
        return super().forward(input_)
