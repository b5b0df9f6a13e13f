"""What SALAD did during a sampling run: gate values per layer and step, measured sparsity,
dropped branches and attention time. Recording never synchronises the device: tensors and CUDA
events are kept and read once, when the summary is asked for."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

import kernels


@dataclass
class StepRecord:
    """One step's records, on the device, in two small tensors whatever the layer count (they
    stay alive for the whole run, so they count towards its peak memory)."""

    step: int | None
    gates: torch.Tensor | None = None  # fp32 [layers, B]; rows of layers not in ``ran`` unset
    ran: set[int] = field(default_factory=set)  # layers whose branch ran (host-side, no sync)
    kept: torch.Tensor | None = None  # kept token pairs, summed over the step's layer calls
    total: float = 0.0  # all token pairs of those calls
    timings: list = field(default_factory=list)  # (start, end) events or seconds


@dataclass(frozen=True)
class RunSummary:
    gates: list[list[float | None]]  # [step][layer], None where the branch did not run
    steps: list[int | None]
    sparsity: float | None
    attention_ms: list[float | None]  # per step, None where not measurable
    dense_steps: int

    def gate_means(self) -> list[float | None]:
        """Per layer, the gate averaged over the steps where it ran."""
        out = []
        for layer in range(len(self.gates[0]) if self.gates else 0):
            vals = [s[layer] for s in self.gates if s[layer] is not None]
            out.append(sum(vals) / len(vals) if vals else None)
        return out


class SaladStats:
    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.active = True
        self._steps: list[StepRecord] = []
        self._dense_steps = 0

    def start_run(self) -> None:
        self._steps = []
        self._dense_steps = 0

    def begin_call(self, step: int | None, dense: bool) -> None:
        if dense:
            self._dense_steps += 1
            return
        if not self._steps or self._steps[-1].step != step or step is None:
            self._steps.append(StepRecord(step))

    def _current(self) -> StepRecord:
        if not self._steps:
            self._steps.append(StepRecord(None))
        return self._steps[-1]

    @contextlib.contextmanager
    def timed(self):
        rec = self._current()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            rec.timings.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            rec.timings.append(time.perf_counter() - t0)

    def record_layer(self, layer: int, selection: kernels.BlockSelection, gate: torch.Tensor | None) -> None:
        rec = self._current()
        if gate is not None:
            if rec.gates is None or rec.gates.shape[1] != gate.shape[0]:
                # (A step's later call with another batch size rewrites every layer it runs.)
                rec.gates = gate.new_zeros((self.num_layers, gate.shape[0]), dtype=torch.float32)
                rec.ran = set()
            rec.gates[layer].copy_(gate.detach())
            rec.ran.add(layer)
        kept = selection.kept_token_pairs()
        rec.kept = kept if rec.kept is None else rec.kept.add_(kept)
        b, h = selection.kv_counts.shape[:2]
        rec.total += float(selection.seq_len) ** 2 * b * h

    def summary(self) -> RunSummary:
        gates, steps, times = [], [], []
        kept, total = 0.0, 0.0
        for rec in self._steps:
            steps.append(rec.step)
            means = [None] * self.num_layers if rec.gates is None else rec.gates.mean(1).tolist()
            gates.append([m if layer in rec.ran else None for layer, m in enumerate(means)])
            kept += 0.0 if rec.kept is None else float(rec.kept)
            total += rec.total
            times.append(_elapsed_ms(rec.timings))
        sparsity = 1.0 - kept / total if total else None
        return RunSummary(gates, steps, sparsity, times, self._dense_steps)


def _elapsed_ms(timings: list) -> float | None:
    if not timings:
        return None
    if isinstance(timings[0], tuple):
        torch.cuda.synchronize()
        return sum(start.elapsed_time(end) for start, end in timings)
    return 1000.0 * sum(timings)
