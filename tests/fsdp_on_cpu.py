"""Run a script under Accelerate's FSDP2 on CPU processes, for tests/test_train_ddp.py.

Accelerate turns FSDP on only for accelerator devices; on CPU processes it falls back to DDP
(MULTI_CPU). This launcher switches that fallback to FSDP2, configured from the same environment
variables `accelerate launch` sets from configs/accelerate/fsdp_8gpu.yaml, so the training loop's
FSDP path (sharded parameters, optimizer and state; full weights gathered for model.safetensors;
unsharded evaluation) runs here with gloo. Usage: torchrun --nproc_per_node 2 fsdp_on_cpu.py SCRIPT ARGS...
"""

import runpy
import sys

from accelerate import state
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init = state.AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables


state.AcceleratorState.__init__ = _fsdp_on_cpu
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
